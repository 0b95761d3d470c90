"""The codebase's own rules: no import cycle among samfit's modules (lazy imports inside functions count), no
module over 400 lines, and no citation of something a user of the repository does not have."""
import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "samfit"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the samfit modules it imports anywhere in its body. `from a import b` counts as importing the
    module a.b when there is one, else a; the parent packages Python imports on the way are not counted."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert "samfit.engine.train" in import_graph()["samfit.cli"]  # a lazy import inside a function counts


def test_no_module_over_400_lines():
    sizes = {module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {m: n for m, n in sizes.items() if n > 400} == {}


def test_no_citation_a_user_of_the_repository_cannot_follow():
    """Cite papers, arXiv ids and docs/reference.md, not the team's private notes or its issue tracker."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"\.\./shared|REFERENCE(\.md| §)|§ ?\d|\b[Ii]ssues? #?\d+")
    outside = ".." + "/shared/" + "REFERENCE" + ".md"  # spelt in parts, so this file does not cite it itself
    assert all(pattern.search(t) for t in (outside, "REFERENCE" + " §2", "see issue 7", "Issue #12"))
    hits = [f"{name}:{i}: {line.strip()}" for name in files if name.endswith((".py", ".md", ".yaml", ".sh", ".toml"))
            and name != "tests/test_codebase.py"
            for i, line in enumerate((ROOT / name).read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []
    assert (ROOT / "docs" / "reference.md").is_file() and "docs/reference.md" in (ROOT / "README.md").read_text()
