"""Placement (`--method-arg blocks=all|last:K|first:K|i,j,k`) for every method whose parts live in the encoder
blocks: syntax checked by the method's Config, the range at apply time against the backbone's depth, counts and
identity at init following the placement, the run name showing it (method@placement), grids over it."""
import dataclasses
import re
from pathlib import Path

import pytest
import torch
import yaml

import samfit
from samfit import SamfitError
from samfit.config import RunConfig
from samfit.grid import load_grid
from samfit.methods.base import select_blocks
from samfit.methods.fact import budget_rank

pytestmark = pytest.mark.usefixtures("one_thread")
METHODS = samfit.list_methods()
PLACEABLE = [n for n in METHODS
             if "blocks" in {f.name for f in dataclasses.fields(type(samfit.get_method(n)).Config)}]
UNPLACEABLE = [n for n in METHODS if n not in PLACEABLE]
OUTSIDE_BLOCKS = {"ssf": lambda d: 2 * d}  # parts outside the blocks, present only with blocks=all


def test_which_methods_take_a_placement():
    assert set(UNPLACEABLE) == {"decoder-only", "sam-adapter", "lst"}
    assert {"lora", "conv-lora", "adapter", "vpt", "bitfit", "ssf", "full", "ln-tune", "adaptformer", "fact",
            "dora", "ia3"} == set(PLACEABLE)


@pytest.mark.parametrize("given,normalised", [("all", "all"), ("ALL", "all"), ("last:3", "last:3"),
                                              ("first: 02", "first:2"), ("0", "0"), (" 7, 1,3", "7,1,3")])
def test_placement_syntax_is_normalised(given, normalised):
    assert samfit.get_method("lora", blocks=given).config.blocks == normalised


@pytest.mark.parametrize("bad", ["last:0", "first:", "last", "-1", "1,1", "1,,2", "1;2", "some", "", 3, None])
def test_bad_placement_syntax_is_a_clear_error(bad):
    with pytest.raises(SamfitError) as err:
        samfit.get_method("dora", blocks=bad)
    message = str(err.value)
    assert message.startswith(f"--method-arg blocks={bad} for method 'dora': must be all, last:K, first:K"), message


@pytest.mark.parametrize("value,expected", [("all", list(range(12))), ("last:3", [9, 10, 11]),
                                            ("first:2", [0, 1]), ("11,0,5", [0, 5, 11]), ("last:12", list(range(12)))])
def test_selected_blocks(value, expected):
    assert select_blocks("lora", value, 12) == expected


def meta_model(method, variant="vit_b", **args):
    with torch.device("meta"):
        return samfit.get_method(method, **args).apply(samfit.build_model(variant, image_size=256))


@pytest.mark.parametrize("value,span", [("last:99", "K from 1 to 12"), ("first:13", "K from 1 to 12"),
                                        ("3,12", "indices from 0 to 11")])
def test_placement_outside_the_backbone_names_key_value_and_range(value, span):
    with pytest.raises(SamfitError) as err:
        meta_model("lora", blocks=value)
    message = str(err.value)
    assert f"--method-arg blocks={value} for method 'lora': must be" in message and span in message, message
    assert "this encoder has 12 blocks" in message


@pytest.mark.parametrize("name", UNPLACEABLE)
def test_a_method_without_per_block_parts_refuses_a_placement(name):
    with pytest.raises(SamfitError) as err:
        samfit.get_method(name, blocks="last:3")
    message = str(err.value)
    assert f"--method-arg blocks=last:3 for method '{name}': this method takes no placement" in message
    assert "lora" in message and name not in message.split("blocks=:")[1], message


def block_of(param_name):
    match = re.search(r"\bblocks\.(\d+)\.", param_name)
    return int(match[1]) if match else None


@pytest.mark.parametrize("name", PLACEABLE)
@pytest.mark.parametrize("value", ["last:3", "0,5"])
def test_counts_and_parts_follow_the_placement(name, value):
    """On vit_b (meta device): the parts sit in the selected blocks only, and the count is the per-block share
    times the number of blocks (FacT: its formula with the rank chosen for that many blocks)."""
    d, depth = 768, 12
    chosen = select_blocks(name, value, depth)
    everywhere, placed = meta_model(name), meta_model(name, blocks=value)
    count = samfit.count_parameters(placed)["encoder_trainable"]
    trainable = [n for n, p in placed.named_parameters() if p.requires_grad and not n.startswith("mask_decoder.")]
    blocks = {block_of(n) for n in trainable}
    if name == "fact":  # shared factors outside the blocks, cores inside
        assert blocks == set(chosen) | {None}
        r = budget_rank(d, len(chosen))
        assert count == 2 * d * r + 4 * r * r * len(chosen)
        return
    assert blocks == set(chosen), sorted(blocks, key=str)
    per_block = samfit.count_parameters(everywhere)["encoder_trainable"] - OUTSIDE_BLOCKS.get(name, lambda d: 0)(d)
    if name == "full":  # every block has the same parameters but for the global blocks' relative positions
        expected = sum(p.numel() for n, p in everywhere.named_parameters() if block_of(n) in chosen)
    else:
        assert per_block % depth == 0
        expected = per_block // depth * len(chosen)
    assert count == expected


def tiny_sam(seed=0):
    torch.manual_seed(seed)
    model = samfit.build_model("tiny", image_size=64)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return model


def float64(model):
    return model.double().eval()


@pytest.mark.parametrize("name", [n for n in PLACEABLE if type(samfit.get_method(n)).identical_at_init])
def test_identity_at_init_holds_with_a_placement(name):
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = float64(samfit.get_method("decoder-only").apply(tiny_sam()))(x)["logits"]
        logits = float64(samfit.get_method(name, blocks="last:2").apply(tiny_sam()))(x)["logits"]
    assert (logits - reference).abs().max() <= 1e-12 * reference.abs().max()


def test_the_run_name_shows_the_placement():
    assert RunConfig(method="lora").run_name() == "shapes_lora_tiny_None_s0"
    assert RunConfig(method="lora", method_args={"blocks": "all"}).run_name() == "shapes_lora_tiny_None_s0"
    assert RunConfig(method="lora", method_args={"blocks": "LAST:3"}).run_name() == "shapes_lora@last:3_tiny_None_s0"
    assert RunConfig(method="ia3", method_args={"blocks": "0, 2"}).run_name() == "shapes_ia3@0,2_tiny_None_s0"
    with pytest.raises(SamfitError, match="blocks=last:0 for method 'lora': must be"):
        RunConfig(method="lora", method_args={"blocks": "last:0"})


def grid_file(tmp_path: Path, overrides) -> Path:
    path = tmp_path / "placement.yaml"
    path.write_text(yaml.safe_dump({
        "name": "placement", "defaults": {"model": "tiny", "image_size": 64, "device": "cpu", "epochs": 1},
        "axes": {"method": ["lora", "dora", "full"], "dataset": ["shapes"], "seed": [0]},
        "overrides": {"method": overrides}}))
    return path


def test_a_grid_sets_placements_per_axis_value_and_names_them(tmp_path, cli):
    path = grid_file(tmp_path, {"lora": {"method_args": {"blocks": "last:2"}},
                                "dora": {"method_args": {"blocks": "0,3", "rank": 2}}})
    grid = load_grid(path, out=str(tmp_path / "out"))
    assert [run.name for run in grid.runs] == ["shapes_lora@last:2_tiny_64_s0", "shapes_dora@0,3_tiny_64_s0",
                                               "shapes_full_tiny_64_s0"]
    code, stdout, error = cli("grid", path, "--dry-run", "--out", tmp_path / "out")
    assert code == 0, error
    rows = [line for line in stdout.splitlines() if "_tiny_64_s0" in line]
    assert [row.split()[3] for row in rows] == [run.name for run in grid.runs]  # "│ 1 │ name │ ..."
    assert all(row.split()[-2] == "new" for row in rows)
    assert not (tmp_path / "out").exists()


def test_a_grid_placement_outside_the_backbone_fails_at_apply_time(tmp_path):
    """The depth is the model's: the grid accepts last:5 (valid syntax); applying it to the 4-block tiny SAM
    names the range."""
    path = grid_file(tmp_path, {"lora": {"method_args": {"blocks": "last:5"}}})
    (run, *_) = load_grid(path, out=str(tmp_path / "out")).runs
    with pytest.raises(SamfitError, match=r"blocks=last:5 for method 'lora': must be .*K from 1 to 4"):
        samfit.get_method(run.method, **run.method_args).apply(samfit.build_model("tiny", image_size=64))


def test_methods_command_counts_a_placement(cli):
    """`samfit methods --method-arg blocks=last:3` counts every placeable method in the last 3 blocks (LoRA:
    3 · 12·d on vit_b) and leaves out the methods without that argument."""
    import json

    code, out, message = cli("methods", "--model", "vit_b", "--method-arg", "blocks=last:3", "--json")
    assert code == 0, message
    rows = {r["method"]: r for r in json.loads(out)}
    assert rows["lora"]["encoder_trainable"] == 3 * 12 * 768 and rows["lora"]["hyperparameters"]["blocks"] == "last:3"
    assert "decoder-only" not in rows and "lst" not in rows
    code, _, message = cli("methods", "--method-arg", "nothing=1")
    assert code == 2 and "No method takes" in message
