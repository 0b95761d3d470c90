"""Archives split into numbered parts (7-Zip / HJSplit `X.zip.001`, `X.zip.002`, ...; `split -d` gives
`X.tar.gz.00`, `.01`, ...): the parts, concatenated in order, are the archive."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from samfit.errors import SamfitError

PART = re.compile(r"^(?P<base>.+\.(?:zip|tar|tar\.gz|tgz))\.(?P<n>\d{2,3})$", re.IGNORECASE)


def join_parts(paths: list[Path], tmp: Path, joined_from: dict[Path, Path]) -> list[Path]:
    """`paths` with every complete set of parts replaced by the archive they make (written under `tmp`;
    `joined_from` maps it to the name the user would recognise, `<folder>/X.zip`). A set with a gap or
    not starting at 0 or 1 is an error naming the first missing part."""
    groups: dict[Path, list[tuple[int, Path]]] = {}
    rest = []
    for path in paths:
        match = PART.match(path.name) if path.is_file() else None
        if match:
            groups.setdefault(path.parent / match["base"], []).append((int(match["n"]), path))
        else:
            rest.append(path)
    for base, parts in sorted(groups.items()):
        parts.sort()
        width = len(PART.match(parts[0][1].name)["n"])
        first = parts[0][0] if parts[0][0] in (0, 1) else 1
        for expected, (number, _) in zip(range(first, first + len(parts) + 1), parts + [(None, None)]):
            if number != expected and number is not None:
                raise SamfitError(f"{base} is split into parts, but part {base}.{expected:0{width}d} is missing "
                                  f"(found {', '.join(p.name for _, p in parts)}). Download every part into "
                                  f"{base.parent}.")
        target = tmp / "joined" / base.name
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as out:
            for _, part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        joined_from[target] = base
        rest.append(target)
    return rest
