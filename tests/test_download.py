"""download_file / download_dataset against a real HTTP server on 127.0.0.1 (Range support switchable)."""
from __future__ import annotations

import hashlib
import io
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samfit.download import download_dataset, download_file, md5sum, mirrored_url
from samfit.errors import SamfitError

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # ~1 MB, more than one read chunk


class Server:
    """Serves `files` (path -> bytes). Honours `Range: bytes=N-` unless `ignore_range`; `cut_after` closes
    the connection after that many body bytes (a dropped download)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.ignore_range = False
        self.cut_after: int | None = None
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                part = body[start:]
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                if server.cut_after is not None:
                    self.wfile.write(part[: server.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(part)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with Server() as s:
        s.files["/files/blob.bin"] = PAYLOAD
        yield s


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_good_download_with_md5_sha256_and_size(server, tmp_path):
    dest = tmp_path / "sub" / "blob.bin"
    out = download_file(f"{server.url}/files/blob.bin", dest, md5=md5(PAYLOAD),
                        sha256=hashlib.sha256(PAYLOAD).hexdigest(), size=len(PAYLOAD), progress=True)
    assert out == dest and dest.read_bytes() == PAYLOAD
    assert not dest.with_suffix(".bin.part").exists()
    assert md5sum(dest) == md5(PAYLOAD)
    # a second call finds the verified file and does not download again
    n = len(server.requests)
    download_file(f"{server.url}/files/blob.bin", dest, md5=md5(PAYLOAD)[:6], progress=False)
    assert len(server.requests) == n


def test_md5_prefix_as_in_sam_file_names(server, tmp_path):
    dest = download_file(f"{server.url}/files/blob.bin", tmp_path / "b.bin", md5=md5(PAYLOAD)[:6], progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_wrong_md5_leaves_nothing_and_names_url_and_checksums(server, tmp_path):
    dest = tmp_path / "blob.bin"
    url = f"{server.url}/files/blob.bin"
    with pytest.raises(SamfitError) as e:
        download_file(url, dest, md5="0" * 32, progress=False)
    msg = str(e.value)
    assert url in msg and "0" * 32 in msg and md5(PAYLOAD) in msg
    assert not dest.exists() and not dest.with_suffix(".bin.part").exists()
    assert list(tmp_path.iterdir()) == []


def test_wrong_size_is_refused(server, tmp_path):
    with pytest.raises(SamfitError, match="size: expected 5 bytes"):
        download_file(f"{server.url}/files/blob.bin", tmp_path / "b.bin", size=5, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_invalid_checksum_argument(server, tmp_path):
    with pytest.raises(SamfitError, match="hex digits"):
        download_file(f"{server.url}/files/blob.bin", tmp_path / "b.bin", md5="01e", progress=False)


def test_resume_half_written_part_with_range(server, tmp_path):
    dest = tmp_path / "blob.bin"
    half = len(PAYLOAD) // 2
    dest.with_suffix(".bin.part").write_bytes(PAYLOAD[:half])
    download_file(f"{server.url}/files/blob.bin", dest, md5=md5(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/files/blob.bin", f"bytes={half}-")


def test_dropped_connection_keeps_part_then_resumes(server, tmp_path):
    dest = tmp_path / "blob.bin"
    url = f"{server.url}/files/blob.bin"
    server.cut_after = 300_000
    with pytest.raises(SamfitError, match="resumes"):
        download_file(url, dest, md5=md5(PAYLOAD), progress=False)
    part = dest.with_suffix(".bin.part")
    assert part.stat().st_size == 300_000 and not dest.exists()
    server.cut_after = None
    download_file(url, dest, md5=md5(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD and server.requests[-1][1] == "bytes=300000-"


def test_complete_part_with_known_size_is_verified_without_network(server, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.with_suffix(".bin.part").write_bytes(PAYLOAD)
    download_file(f"{server.url}/files/blob.bin", dest, md5=md5(PAYLOAD), size=len(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD and server.requests == []


def test_server_ignoring_range_restarts(server, tmp_path):
    server.ignore_range = True
    dest = tmp_path / "blob.bin"
    dest.with_suffix(".bin.part").write_bytes(b"garbage-that-must-not-survive")
    download_file(f"{server.url}/files/blob.bin", dest, md5=md5(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_complete_part_answered_416_restarts(server, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.with_suffix(".bin.part").write_bytes(PAYLOAD + b"extra")
    download_file(f"{server.url}/files/blob.bin", dest, md5=md5(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_404_names_url_and_suggests_manual_download(server, tmp_path):
    url = f"{server.url}/files/missing.bin"
    with pytest.raises(SamfitError) as e:
        download_file(url, tmp_path / "m.bin", progress=False)
    msg = str(e.value)
    assert url in msg and "404" in msg and "manually" in msg
    assert list(tmp_path.iterdir()) == []


def test_connection_refused(tmp_path):
    with Server() as s:
        url = f"{s.url}/x.bin"
    with pytest.raises(SamfitError, match="Could not download http://127.0.0.1"):
        download_file(url, tmp_path / "x.bin", progress=False, timeout=5)


def test_mirrored_url(monkeypatch):
    monkeypatch.delenv("SAMFIT_DATA_URL", raising=False)
    url = "https://isic-challenge-data.s3.amazonaws.com/2017/ISIC-2017_Training_Data.zip"
    assert mirrored_url(url) == url
    monkeypatch.setenv("SAMFIT_DATA_URL", "http://127.0.0.1:9/mirror/")
    assert mirrored_url(url) == "http://127.0.0.1:9/mirror/ISIC-2017_Training_Data.zip"


# --- download_dataset end to end: a fake ISIC 2017 set (six official zips) on the local server -------------

ISIC_SPLITS = {"Training": "train", "Validation": "val", "Test_v2": "test"}


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG")
    return buf.getvalue()


def fake_isic_zips() -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """{zip name: bytes} in the official naming, and {split/stem: mask} to compare against."""
    rng = np.random.default_rng(0)
    zips, masks = {}, {}
    for k, (official, split) in enumerate(ISIC_SPLITS.items()):
        data, gt = io.BytesIO(), io.BytesIO()
        with zipfile.ZipFile(data, "w") as zd, zipfile.ZipFile(gt, "w") as zg:
            folder = f"ISIC-2017_{official}_Data"
            zd.writestr(f"{folder}/{folder}_metadata.csv", "image_id,age\n")
            for i in range(2):
                stem = f"ISIC_{k * 10 + i:07d}"
                zd.writestr(f"{folder}/{stem}.jpg", _jpg(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)))
                zd.writestr(f"{folder}/{stem}_superpixels.png", _png(np.zeros((20, 24, 3), np.uint8)))
                mask = np.zeros((20, 24), np.uint8)
                mask[5:12, 3 + i:15] = 255
                zg.writestr(f"ISIC-2017_{official}_Part1_GroundTruth/{stem}_segmentation.png", _png(mask))
                masks[f"{split}/{stem}"] = mask
        zips[f"ISIC-2017_{official}_Data.zip"] = data.getvalue()
        zips[f"ISIC-2017_{official}_Part1_GroundTruth.zip"] = gt.getvalue()
    return zips, masks


def test_download_dataset_isic_end_to_end(server, tmp_path, monkeypatch):
    zips, masks = fake_isic_zips()
    for name, body in zips.items():
        server.files[f"/mirror/{name}"] = body
    spec = {"downloads": [
        {"url": f"https://isic-challenge-data.s3.amazonaws.com/2017/{name}", "file": name,
         "md5": md5(body) if i % 2 == 0 else None, "size": len(body)}
        for i, (name, body) in enumerate(zips.items())
    ]}
    monkeypatch.setenv("SAMFIT_DATA_URL", f"{server.url}/mirror")
    root = download_dataset("isic2017", spec, tmp_path / "data", progress=False)
    assert root == tmp_path / "data" / "isic2017"
    assert sorted(p.name for p in (tmp_path / "data" / "downloads").iterdir()) == sorted(zips)
    for key, mask in masks.items():
        split, stem = key.split("/")
        assert (root / split / "images" / f"{stem}.jpg").is_file()
        assert np.array_equal(np.asarray(Image.open(root / split / "masks" / f"{stem}.png")), mask)
    assert not list(root.rglob("*superpixels*"))
    # a second run downloads nothing
    n = len(server.requests)
    download_dataset("isic2017", spec, tmp_path / "data", progress=False)
    assert len(server.requests) == n


def test_download_dataset_without_direct_urls_explains_manual_route(tmp_path):
    spec = {"source": {"homepage": "https://github.com/GewelsJI/SINet-V2"}, "downloads": []}
    with pytest.raises(SamfitError) as e:
        download_dataset("cod", spec, tmp_path)
    msg = str(e.value)
    assert "https://github.com/GewelsJI/SINet-V2" in msg and "samfit data prepare cod --source PATH" in msg


def test_download_dataset_failure_names_prepare_route(server, tmp_path, monkeypatch):
    monkeypatch.setenv("SAMFIT_DATA_URL", f"{server.url}/nothing-here")
    spec = {"downloads": [{"url": "https://example.org/x/ISIC-2017_Training_Data.zip",
                           "file": "ISIC-2017_Training_Data.zip", "md5": None}]}
    with pytest.raises(SamfitError) as e:
        download_dataset("isic2017", spec, tmp_path)
    assert "404" in str(e.value) and "samfit data prepare isic2017 --source PATH" in str(e.value)


def test_download_dataset_accepts_registry_spec_objects(tmp_path):
    from samfit.data.registry import load_registry

    specs = load_registry()
    with pytest.raises(SamfitError) as e:
        download_dataset("trans10k-v2", specs["trans10k-v2"], tmp_path)
    assert "https://github.com/xieenze/Trans2Seg" in str(e.value) and "masks_12" in str(e.value)
    with pytest.raises(SamfitError, match="generated by samfit"):
        download_dataset("shapes", specs["shapes"], tmp_path)
    assert [d["file"] for d in specs["isic2017"].downloads][0] == "ISIC-2017_Training_Data.zip"
