"""`samfit report`: one self-contained HTML page, rendered by a real headless browser (Debian's chromium, which
.ci/run installs): the rendered DOM holds the verdict rows, every method and dataset, each run's settings; every
image decodes; nothing is fetched and the console stays silent."""
import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from test_compare import image_rows, write_run

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (`apt-get install -y "
                                                             "chromium`; .ci/run installs it)")
# Run in the page after it loads: each image's decoded size, resources fetched from anywhere but data: URIs.
PROBE = """<script>window.addEventListener("load", () => {
  for (const img of document.images)
    img.setAttribute("data-decoded", img.complete && img.naturalWidth > 0 ? img.naturalWidth + "x" + img.naturalHeight : "no");
  const fetched = performance.getEntriesByType("resource").filter(e => !e.name.startsWith("data:"));
  document.body.setAttribute("data-fetched", String(fetched.length));
  document.body.setAttribute("data-probe", "done");
});</script>"""


def render(page: Path, tmp: Path) -> tuple[str, str]:
    """(the DOM chromium renders from a copy of `page` with PROBE added, chromium's log)."""
    probed = tmp / "probed.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0",
                           "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


class Elements(HTMLParser):
    """Every element's tag and attributes, and the text of the page."""

    def __init__(self, text: str):
        super().__init__()
        self.elements, self.text = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def find(self, tag, **attrs):
        return [a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def check_rendered(dom: str, log: str, methods, datasets, comparisons: int) -> Elements:
    page = Elements(dom)
    body = page.find("body")[0]
    assert body.get("data-probe") == "done" and body.get("data-fetched") == "0"
    images = page.find("img")
    assert images and all(re.fullmatch(r"[1-9]\d*x[1-9]\d*", i["data-decoded"]) for i in images)
    rows = [a for t, a in page.elements if t == "tr" and "data-verdict" in a]
    assert len(rows) == comparisons
    assert {r["data-verdict"] for r in rows} <= {"better", "worse", "no detectable difference"}
    assert {r["data-dataset"] for r in rows} == set(datasets)
    assert {r["data-method"] for r in rows} | {r["data-baseline"] for r in rows} == set(methods)
    text = " ".join(page.text)
    assert all(m in text for m in methods) and all(d in text for d in datasets)
    assert "nan" not in text.lower().split()
    assert ":CONSOLE" not in log, [line for line in log.splitlines() if ":CONSOLE" in line]
    return page


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "runs"
    for k, dataset in enumerate(("blobs", "drops")):
        for seed in (0, 1):
            for method, quality in (("lora", 1), ("decoder-only", 3), ("bitfit", 1)):
                write_run(root, method, seed, image_rows(np.random.default_rng(10 * k + seed), 20, quality),
                          dataset=dataset)
    return root


def test_report_is_self_contained(cli, results, tmp_path):
    out = tmp_path / "report.html"
    code, _, message = cli("report", results, "--out", out, "--rope", "0.5", "--resamples", "200")
    assert code == 0, message
    text = out.read_text()
    assert "<script" not in text and not re.search(r"""(src|href)=["']?(https?:|//)""", text)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) >= 4  # the CD diagram and the plots
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    for heading in ("Results", "Verdicts against lora", "Ranks across test sets", "Bayesian signed-rank", "Plots",
                    "Runs and their settings"):
        assert f">{heading}" in text
    assert text.count('<details class="run">') == 12
    code, _, message = cli("report", results, "--out", out, "--rope", "-2")
    assert code == 2 and "--rope -2" in message


def test_report_on_runs_without_per_image_rows_says_so(cli, tmp_path):
    root = tmp_path / "old"
    for method in ("lora", "bitfit"):
        write_run(root, method, 0, image_rows(np.random.default_rng(0), 10, 1), per_image=method == "bitfit")
    out = tmp_path / "report.html"
    code, _, message = cli("report", root, "--out", out)
    assert code == 0, message
    text = out.read_text()
    assert "No verdicts: 1 run(s) have no per-image rows" in text and "data-verdict" not in text
    assert ">lora<" in text and ">bitfit<" in text  # the grid is still shown


@pytest.mark.slow
@needs_chromium
def test_report_renders_in_headless_chromium(cli, results, tmp_path):
    out = tmp_path / "report.html"
    code, _, message = cli("report", results, "--out", out, "--resamples", "200")
    assert code == 0, message
    dom, log = render(out, tmp_path)
    page = check_rendered(dom, log, ["lora", "decoder-only", "bitfit"], ["blobs", "drops"], 4)
    decoder = [a for t, a in page.elements if t == "tr" and a.get("data-method") == "decoder-only"]
    assert {a["data-verdict"] for a in decoder} == {"better"} and len(decoder) == 2


@pytest.mark.slow
@needs_chromium
def test_report_on_one_method_says_why_there_are_no_verdicts(cli, tmp_path):
    root = tmp_path / "alone"
    write_run(root, "lora", 0, image_rows(np.random.default_rng(0), 10, 1))
    out = tmp_path / "report.html"
    code, _, message = cli("report", root, "--out", out)
    assert code == 0, message
    dom, log = render(out, tmp_path)
    page = Elements(dom)
    assert "No verdicts: Only lora ran here" in " ".join(page.text) and ":CONSOLE" not in log
