"""Resumable, verified downloads (SAM checkpoints, dataset archives).

`download_file` streams a URL to `<dest>.part`, resumes a partial `.part` with an HTTP Range request,
checks size and checksum, and only then renames the file into place: a file at `dest` is always complete
and verified. `download_dataset` fetches the archives listed under a datasets.yaml entry's `downloads:`
and hands them to `samfit.data.prepare.prepare_dataset`.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import socket
import urllib.error
import urllib.request
from contextlib import nullcontext
from pathlib import Path
from urllib.parse import urlsplit

from samfit.errors import SamfitError

CHUNK = 1 << 20
DATA_URL_ENV = "SAMFIT_DATA_URL"
MIN_PREFIX = 6


def md5sum(path: Path) -> str:
    """Hex MD5 of a file, read in chunks."""
    return _digest(path, "md5")


def sha256sum(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    return _digest(path, "sha256")


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _expected_checksums(url: str, md5: str | None, sha256: str | None) -> dict[str, str]:
    """{'md5': prefix, 'sha256': prefix} of the checksums to verify (a prefix of >= 6 hex digits is allowed)."""
    expected = {}
    for algorithm, value, full in (("md5", md5, 32), ("sha256", sha256, 64)):
        if value is None:
            continue
        value = value.strip().lower()
        if not (MIN_PREFIX <= len(value) <= full) or any(c not in "0123456789abcdef" for c in value):
            raise SamfitError(
                f"Invalid {algorithm} '{value}' given for {url}: expected {MIN_PREFIX} to {full} hex digits "
                f"(the whole checksum or its start)."
            )
        expected[algorithm] = value
    return expected


def _mismatches(path: Path, size: int | None, expected: dict[str, str], hashers: dict | None = None) -> list[str]:
    """Descriptions of every failed check of `path` (empty when it is good)."""
    problems = []
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        problems.append(f"size: expected {size} bytes, got {actual_size}")
    for algorithm, want in expected.items():
        got = hashers[algorithm].hexdigest() if hashers else _digest(path, algorithm)
        if not got.startswith(want):
            problems.append(f"{algorithm}: expected {want}{'…' if len(want) < len(got) else ''}, got {got}")
    return problems


def _network_error(url: str, dest: Path, reason: str, hint: str | None, resumable: bool) -> SamfitError:
    todo = hint or (
        f"Download it manually (e.g. with a browser) from {url} and save it as {dest}, "
        f"or pass the path of a copy you already have."
    )
    again = " Running the command again resumes the partial download." if resumable else ""
    return SamfitError(f"Could not download {url}: {reason}.{again} {todo}")


def download_file(
    url: str,
    dest: Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    size: int | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    hint: str | None = None,
) -> Path:
    """Download `url` to `dest` and return `dest`.

    The bytes go to `dest` + ".part"; an existing `.part` is resumed with `Range: bytes=N-` (restarted from
    zero when the server answers 200 instead of 206). When the stream ends the size and the checksums
    (`md5` and/or `sha256`: the whole hex digest or its first >= 6 digits, as SAM's file names carry) are
    checked; on a mismatch the partial file is deleted and SamfitError names the URL, expected and actual
    values. Only a verified file is renamed (atomically) to `dest`. An existing `dest` that passes the
    checks is returned without downloading. Network failures raise SamfitError with `hint` (or a default
    "download it manually" advice) and keep the `.part` for resuming.
    """
    dest = Path(dest)
    expected = _expected_checksums(url, md5, sha256)
    if dest.is_file() and not _mismatches(dest, size, expected):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    hashers = {algorithm: hashlib.new(algorithm) for algorithm in expected}

    offset = part.stat().st_size if part.is_file() else 0
    if size is not None and offset > size:
        part.unlink()
        offset = 0
    if size is not None and offset == size:  # complete but never verified (interrupted before the rename)
        return _verify_and_place(url, part, dest, size, expected, None)
    try:
        response = _open(url, offset, timeout)
        if response is None:  # 416: the .part is useless (complete or larger than the file): start over
            part.unlink()
            offset = 0
            response = _open(url, 0, timeout)
        if offset and not _resumes_at(response, offset):  # the server ignored Range: restart
            response.close()
            offset = 0
            response = _open(url, 0, timeout)
        with response:
            if offset:
                with open(part, "rb") as f:
                    for chunk in iter(lambda: f.read(CHUNK), b""):
                        for h in hashers.values():
                            h.update(chunk)
            length = response.headers.get("Content-Length")
            total = offset + int(length) if length is not None and length.isdigit() else size
            received = _stream(response, part, offset, total, hashers, dest.name, progress)
    except urllib.error.HTTPError as e:
        raise _network_error(url, dest, f"HTTP {e.code} {e.reason}", hint, resumable=False) from None
    except urllib.error.URLError as e:
        raise _network_error(url, dest, str(e.reason), hint, resumable=part.is_file()) from None
    except (socket.timeout, TimeoutError) as e:
        raise _network_error(url, dest, f"timed out ({e})", hint, resumable=part.is_file()) from None
    except http.client.HTTPException as e:
        raise _network_error(url, dest, f"{type(e).__name__} {e}", hint, resumable=part.is_file()) from None
    except OSError as e:
        if not isinstance(e, ConnectionError) and e.filename:
            raise SamfitError(f"Cannot write {e.filename}: {e.strerror}. Check the folder's permissions "
                              f"and free space.") from None
        raise _network_error(url, dest, str(e), hint, resumable=part.is_file()) from None
    if length is not None and length.isdigit() and received < offset + int(length):
        raise _network_error(url, dest, f"the connection closed after {received} of {offset + int(length)} "
                             f"bytes", hint, resumable=True)

    return _verify_and_place(url, part, dest, size, expected, hashers)


def _verify_and_place(url: str, part: Path, dest: Path, size: int | None, expected: dict, hashers) -> Path:
    """Rename `part` to `dest` if it passes the checks; otherwise delete it and raise."""
    problems = _mismatches(part, size, expected, hashers)
    if problems:
        part.unlink()
        raise SamfitError(
            f"The file downloaded from {url} is not the expected one ({'; '.join(problems)}). "
            f"It was deleted and nothing was written to {dest}. Try again; if it keeps failing, the file on the "
            f"server has changed: download it by hand and check it."
        )
    os.replace(part, dest)
    return dest


def _open(url: str, offset: int, timeout: float):
    """The HTTP response for `url` from byte `offset` (None when the server answers 416 to the Range)."""
    request = urllib.request.Request(url, headers={"User-Agent": "samfit"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            e.close()
            return None
        raise


def _resumes_at(response, offset: int) -> bool:
    """True when `response` is a 206 whose Content-Range starts at `offset`."""
    if response.status != 206:
        return False
    content_range = response.headers.get("Content-Range", "")
    try:
        start = int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return True  # 206 without a parsable Content-Range: trust the status
    return start == offset


def _stream(response, part: Path, offset: int, total: int | None, hashers: dict, label: str, progress: bool) -> int:
    """Append the response body to `part` (truncated first when offset is 0); returns the file's final size."""
    received = offset
    with open(part, "ab" if offset else "wb") as f, _progress_bar(progress) as bar:
        task = bar.add_task(label, total=total, completed=offset) if bar is not None else None
        for chunk in iter(lambda: response.read(CHUNK), b""):
            f.write(chunk)
            for h in hashers.values():
                h.update(chunk)
            received += len(chunk)
            if bar is not None:
                bar.update(task, completed=received)
    return received


def _progress_bar(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), transient=False)


def mirrored_url(url: str) -> str:
    """`url`, or its file on the mirror named by $SAMFIT_DATA_URL.

    With SAMFIT_DATA_URL set (e.g. `http://127.0.0.1:8000/mirror`), everything in `url` up to and including
    its last '/' (scheme, host and folder) is replaced by that value: `https://host/a/b/file.zip` becomes
    `http://127.0.0.1:8000/mirror/file.zip`. Query strings are dropped. Unset or empty: `url` unchanged.
    """
    base = os.environ.get(DATA_URL_ENV, "").strip()
    if not base:
        return url
    name = urlsplit(url).path.rsplit("/", 1)[-1]
    return f"{base.rstrip('/')}/{name}"


def download_dataset(name: str, spec, data_root: Path, *, progress: bool = True) -> Path:
    """Download the archives of datasets.yaml entry `spec` and prepare dataset `name`; returns its folder.

    `spec`: the entry as a dict, or an object with `downloads` and `source` attributes (a DatasetSpec).
    Each item of its `downloads` ({url, file, md5, sha256, size}) is fetched with `download_file` into
    `<data_root>/downloads/<file>` (kept, so a second run does not download again; URLs rewritten by
    `mirrored_url`), then `prepare_dataset(name, [those files], data_root)` writes
    `<data_root>/<name>/<split>/{images,masks}`. No `downloads`: SamfitError saying where to get the data
    by hand and how to prepare it.
    """
    from samfit.data.prepare import prepare_dataset

    data_root = Path(data_root)
    if _field(spec, "synthetic"):
        raise SamfitError(f"Dataset '{name}' is generated by samfit on first use; there is nothing to download.")
    downloads = _field(spec, "downloads") or []
    if not downloads:
        raise SamfitError(_manual_instructions(name, _field(spec, "source") or {}))
    files = []
    for item in downloads:
        if not isinstance(item, dict) or not item.get("url"):
            raise SamfitError(f"datasets.yaml: every item under '{name}: downloads:' needs a 'url' "
                              f"(got {item!r}).")
        url = mirrored_url(item["url"])
        file_name = item.get("file") or urlsplit(item["url"]).path.rsplit("/", 1)[-1]
        dest = data_root / "downloads" / file_name
        hint = (f"Download it by hand from {item['url']} into {dest.parent} (then run this command again), "
                f"or prepare the dataset from your copy with `samfit data prepare {name} --source PATH`.")
        files.append(download_file(url, dest, md5=item.get("md5"), sha256=item.get("sha256"),
                                   size=item.get("size"), progress=progress, hint=hint))
    return prepare_dataset(name, files, data_root, progress=progress)


def _field(spec, key: str):
    return spec.get(key) if isinstance(spec, dict) else getattr(spec, key, None)


def _manual_instructions(name: str, source: dict) -> str:
    where = []
    for key in ("homepage", "url", "urls", "code", "original"):
        value = source.get(key)
        if isinstance(value, str):
            where.append(value)
        elif isinstance(value, (list, tuple)):
            where.extend(str(v) for v in value)
    place = f" from {', '.join(where)}" if where else ""
    layout = source.get("layout")
    layout_text = f" Expected layout: {layout}." if isinstance(layout, str) else ""
    return (f"Dataset '{name}' has no direct public download. Download it by hand{place}, then run "
            f"`samfit data prepare {name} --source PATH` with PATH the downloaded archive or its unpacked "
            f"folder.{layout_text}")
