"""`samfit weights download` end to end against a real HTTP server on 127.0.0.1 (SAMFIT_WEIGHTS_URL)."""
import hashlib
import io
import os
import subprocess
import sys

import pytest
import torch
from test_download import server  # noqa: F401  (the 127.0.0.1 file server fixture)
from test_model import official_tiny_sam

import samfit
from samfit.model import backbones
from samfit.model import sam as sam_module


def _serve(server, name: str, body: bytes) -> str:
    server.files[f"/weights/{name}"] = body
    return f"{server.url}/weights"


def test_download_verifies_md5_then_the_weights_load(server, tmp_path, monkeypatch):
    buffer = io.BytesIO()
    torch.save(official_tiny_sam().state_dict(), buffer)
    body = buffer.getvalue()
    # an "official" variant whose MD5 we know: tiny's architecture under an official-style file name
    variant = sam_module.Variant(64, 4, 2, (1, 3), window=4, file="sam_tiny_test.pth",
                                 md5=hashlib.md5(body).hexdigest(), fixed_size=128)
    monkeypatch.setitem(sam_module.VARIANTS, "tiny_official", variant)
    weights = backbones.Weights(variant.file, backbones.SAM_URL + variant.file, variant.md5)
    monkeypatch.setitem(backbones.BACKBONES, "tiny_official", backbones._sam("tiny_official", "tiny_official", weights))
    monkeypatch.setenv("SAMFIT_WEIGHTS_URL", _serve(server, variant.file, body))
    monkeypatch.setenv("SAMFIT_CHECKPOINTS", str(tmp_path / "ckpt"))
    from typer.testing import CliRunner

    from samfit.cli import app

    result = CliRunner().invoke(app, ["weights", "download", "tiny_official"])
    assert result.exit_code == 0, result.output
    dest = tmp_path / "ckpt" / "sam_tiny_test.pth"
    assert dest.read_bytes() == body
    state = sam_module.load_sam_state(backbones.resolve_checkpoint("tiny_official", None), "tiny")
    assert torch.equal(state["image_encoder.pos_embed"], official_tiny_sam().state_dict()["image_encoder.pos_embed"])


@pytest.mark.slow
def test_wrong_md5_is_a_clear_error_and_nothing_is_left(server, tmp_path):
    url = _serve(server, "sam_vit_b_01ec64.pth", b"definitely not the vit_b weights" * 100)
    env = dict(os.environ, SAMFIT_WEIGHTS_URL=url, SAMFIT_CHECKPOINTS=str(tmp_path / "ckpt"), COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "samfit", "weights", "download", "vit_b"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    message = " ".join(proc.stderr.split())
    assert "01ec64d29a2fca3f0661936605ae66f8" in message and "sam_vit_b_01ec64.pth" in message
    folder = tmp_path / "ckpt"
    assert not folder.exists() or not any(folder.iterdir())


def test_tiny_has_no_weights_to_download():
    variants = sam_module.VARIANTS
    assert not variants["tiny"].has_weights and variants["tiny"].fixed_size == 128
    assert all(variants[n].has_weights and variants[n].fixed_size is None for n in ("vit_b", "vit_l", "vit_h"))
    with pytest.raises(samfit.SamfitError, match="no official weights"):
        from samfit.cli import weights_download

        weights_download("tiny")
