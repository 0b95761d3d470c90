"""The backbone registry: every model name builds, counts, validates its input size, resolves and downloads its
weights through the same commands."""
import hashlib
import json

import pytest
import torch
from test_download import server  # noqa: F401  (the 127.0.0.1 file server fixture)

import samfit
from samfit import SamfitError
from samfit.model.backbones import BACKBONES, SAM2_URL, check_image_size, get_backbone, weights_url

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = list(BACKBONES)


def test_registry_names_and_official_files():
    assert NAMES == ["vit_b", "vit_l", "vit_h", "tiny", "medsam_vit_b", "sam2_hiera_t", "sam2_hiera_s",
                     "sam2_hiera_b+", "sam2_hiera_l", "sam2_tiny"]
    files = {"sam2_hiera_t": "sam2.1_hiera_tiny.pt", "sam2_hiera_s": "sam2.1_hiera_small.pt",
             "sam2_hiera_b+": "sam2.1_hiera_base_plus.pt", "sam2_hiera_l": "sam2.1_hiera_large.pt"}
    for name, file in files.items():
        assert weights_url(name) == SAM2_URL + file == "https://dl.fbaipublicfiles.com/segment_anything_2/092824/" + file
    assert weights_url("vit_b") == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    assert not get_backbone("tiny").has_weights and not get_backbone("sam2_tiny").has_weights
    with pytest.raises(SamfitError, match="Unknown model 'sam3'"):
        get_backbone("sam3")


@pytest.mark.parametrize("name,good,bad", [("vit_b", 48, 40), ("sam2_hiera_t", 64, 48), ("medsam_vit_b", 80, 81)])
def test_image_size_validated_per_backbone(name, good, bad):
    check_image_size(name, good)
    with pytest.raises(SamfitError, match=rf"--image-size {bad} is not a positive multiple of .* for --model {name}"):
        check_image_size(name, bad)


def test_run_refuses_a_size_hiera_cannot_take(cli):
    code, _, message = cli("run", "--model", "sam2_tiny", "--image-size", "48", "--print-config")
    assert code == 2 and "multiple of 32" in message and "sam2_tiny" in message


@pytest.mark.parametrize("name", NAMES)
def test_every_model_name_is_a_run_setting(name, printed_config):
    assert printed_config("--model", name, "--image-size", "64")["model"] == name


@pytest.mark.parametrize("name", ["tiny", "medsam_vit_b", "sam2_tiny", "sam2_hiera_t"])  # one of each kind
def test_methods_lists_every_method_with_counts_or_na(name, cli):
    code, out, message = cli("methods", "--model", name, "--json")
    assert code == 0, message
    rows = {r["method"]: r for r in json.loads(out)}
    assert set(rows) == set(samfit.list_methods())
    applies = {n for n, r in rows.items() if r.get("applies", True)}
    family = get_backbone(name).family
    assert applies == (set(rows) if family == "sam" else set(rows) - {"fact", "vpt", "sam-adapter", "lst"})


def test_weights_download_for_sam2_and_the_models_without_a_url(server, tmp_path, monkeypatch, cli):  # noqa: F811
    server.files["/w/sam2.1_hiera_tiny.pt"] = b"sam2 bytes" * 10
    monkeypatch.setenv("SAMFIT_WEIGHTS_URL", f"{server.url}/w")
    monkeypatch.setenv("SAMFIT_CHECKPOINTS", str(tmp_path / "ckpt"))
    code, _, message = cli("weights", "download", "sam2_hiera_t")
    assert code == 0, message
    assert (tmp_path / "ckpt" / "sam2.1_hiera_tiny.pt").read_bytes() == b"sam2 bytes" * 10
    record = json.loads((tmp_path / "ckpt" / "sam2.1_hiera_tiny.pt.sha256.json").read_text())
    assert record == {"file": "sam2.1_hiera_tiny.pt", "size": 100, "sha256": hashlib.sha256(b"sam2 bytes" * 10).hexdigest()}
    code, _, message = cli("weights", "download", "medsam_vit_b")
    assert code == 2 and "drive.google.com" in message and "--checkpoint" in message
    code, _, message = cli("weights", "download", "sam2_tiny")
    assert code == 2 and "no official weights" in message


def test_sam2_meta_build_counts_match_real_build():
    """The meta-device build (used for counting) has the parameters of the real one."""
    real = samfit.build_model("sam2_tiny", image_size=64)
    with torch.device("meta"):
        meta = samfit.build_model("sam2_tiny", image_size=64)
    assert samfit.count_parameters(real) == samfit.count_parameters(meta)


def test_grid_takes_a_backbone_axis(tmp_path):
    """`model` is a RunConfig field, so it is a grid axis; a pair with no faithful form is refused at load time
    (exclude it), before any run starts."""
    import yaml

    from samfit.grid import load_grid

    grid = {"defaults": {"image_size": 64, "epochs": 1, "limit_train": 4, "limit_eval": 2, "device": "cpu"},
            "axes": {"method": ["lora", "fact"], "model": ["tiny", "sam2_tiny"]}}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(grid))
    with pytest.raises(SamfitError, match="method=fact, model=sam2_tiny.*no faithful form on --model sam2_tiny"):
        load_grid(path, out=str(tmp_path / "out"))
    path.write_text(yaml.safe_dump({**grid, "exclude": [{"method": "fact", "model": "sam2_tiny"}]}))
    runs = load_grid(path, out=str(tmp_path / "out")).runs
    assert [(c.method, c.model) for c in runs] == [("lora", "tiny"), ("lora", "sam2_tiny"), ("fact", "tiny")]


def test_table_shows_na_for_a_method_without_a_form_on_a_model():
    import pandas as pd

    from samfit.report.table import comparison_grid

    base = {"dataset": "shapes", "test_set": "test", "metric": "iou_per_image", "lower_is_better": False,
            "std": 0.0, "seeds": 1, "trainable": 10, "percent_of_sam": 1.0, "step_time_s": 0.1,
            "peak_memory_mb": 1.0}
    summary = pd.DataFrame([{**base, "method": "fact", "model": "tiny", "mean": 0.5},
                            {**base, "method": "lora", "model": "sam2_tiny", "mean": 0.6}])
    grid = comparison_grid(summary)
    rows = {(r["method"], r["model"]): r for r in grid.to_dict("records")}
    assert set(rows) == {("fact", "tiny"), ("lora", "sam2_tiny"), ("fact", "sam2_tiny")}
    assert rows["fact", "sam2_tiny"]["trainable"] == "n/a" and rows["fact", "sam2_tiny"]["shapes iou_per_image"] == "n/a"
    assert rows["lora", "sam2_tiny"]["shapes iou_per_image"] != "n/a"


@pytest.mark.slow  # two timed configurations: ~5 s on a loaded machine
def test_bench_runs_on_sam2():
    """`samfit bench --model sam2_tiny`: the same records (no memory subprocess here), ratios to LoRA."""
    from samfit.engine.bench import Shape, run_bench

    records, meta = run_bench(["lora", "decoder-only"], Shape("sam2_tiny", 64, 1, "cpu"), steps=1, warmup=1,
                              memory=False, log=lambda *_: None)
    assert [r["method"] for r in records] == ["lora", "decoder-only"]
    assert all(r["step_time_s"] > 0 for r in records) and records[0]["step_time_s_vs_baseline"] == 1.0
    lora = samfit.count_parameters(samfit.get_method("lora").apply(samfit.build_model("sam2_tiny", image_size=64)))
    assert records[0]["trainable_params"] == lora["trainable"]
