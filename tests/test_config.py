"""Run settings have one source, RunConfig: each layer of defaults < datasets.yaml < --config file < flags, the
CLI options derived from the fields, --set for any field, and clear errors for bad values."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from samfit.config import FIELDS, RunConfig, allowed_values, make_config, option_name, parse_set
from samfit.errors import SamfitError

ROOT = Path(__file__).resolve().parents[1]

# A valid value other than the default for every field, as a config file would hold it.
FILE_VALUES = {
    "method": "conv-lora", "dataset": "isic2017", "model": "vit_l", "checkpoint": "/weights/sam.pth",
    "image_size": 512, "epochs": 3, "lr": 2.0e-4, "batch_size": 2, "effective_batch": 8, "weight_decay": 0.05,
    "grad_clip": 0.5, "flip": False, "seed": 7, "device": "cpu", "precision": "bf16", "attention": "reference",
    "grad_checkpoint": True, "loss": "dice", "method_args": {"rank": 4, "experts": 4}, "limit_train": 10,
    "limit_eval": 5, "eval_resolution": "model", "num_workers": 2, "datasets_file": None, "data_root": "/data",
    "skip_bad": True, "detect_anomaly": True, "cache_embeddings": "off", "cache_max_mb": 100, "out": "elsewhere",
    "name": "from-file", "protocol": "official", "decay_exclude": "bias-norm",
    "train_fraction": 0.5, "head": "official", "queries": 10, "decoder": "lora:4",
    "cache_dtype": "bf16",
}
# Another valid value for every field, as flags would give it.
FLAG_VALUES = {
    "method": "lora", "dataset": "polyp", "model": "vit_b", "checkpoint": "/weights/other.pth", "image_size": 256,
    "epochs": 4, "lr": 3.0e-4, "batch_size": 1, "effective_batch": 2, "weight_decay": 0.0, "grad_clip": 2.0,
    "flip": True, "seed": 8, "device": "auto", "precision": "fp32", "attention": "sdpa", "grad_checkpoint": False,
    "loss": "bce", "method_args": {"rank": 2}, "limit_train": 11, "limit_eval": 6, "eval_resolution": "gt",
    "num_workers": 0, "datasets_file": None, "data_root": "/data2", "skip_bad": False, "detect_anomaly": False,
    "cache_embeddings": "on", "cache_max_mb": 200, "out": "there", "name": "from-flags", "protocol": "samfit",
    "decay_exclude": "none", "train_fraction": 0.25, "head": "samfit", "queries": 8, "decoder": "frozen",
    "cache_dtype": "fp16",
}


def samfit(*args):
    """The command line in a fresh process: exit code and stderr as a user sees them."""
    return subprocess.run([sys.executable, "-m", "samfit", *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def as_flags(values: dict) -> list[str]:
    flags = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(option_name(key) if value else "--no-" + option_name(key)[2:])
        elif isinstance(value, dict):
            for k, v in value.items():
                flags += [option_name(key), f"{k}={v}"]
        else:
            flags += [option_name(key), str(value)]
    return flags


def test_the_tables_cover_every_field_with_values_other_than_the_default():
    """A new RunConfig field must be added here, so the layer tests below cover it."""
    defaults = RunConfig().to_dict()
    assert FILE_VALUES.keys() == FLAG_VALUES.keys() == FIELDS.keys()
    for key in FIELDS:
        if key == "datasets_file":  # a file path the tests cannot vary without a second registry
            continue
        assert FILE_VALUES[key] != defaults[key] and FLAG_VALUES[key] != FILE_VALUES[key], key


def test_defaults_layer(data_root, printed_config):
    printed = printed_config()
    cfg = RunConfig()
    assert printed == {**cfg.to_dict(), "image_size": 128, "epochs": 14, "lr": 1e-3, "loss": "structure"}


def test_dataset_layer_fills_only_unset_fields(printed_config):
    printed = printed_config("--dataset", "isic2017", "--model", "vit_b")
    assert (printed["image_size"], printed["epochs"], printed["lr"], printed["loss"]) == (1024, 30, 1e-4, "structure")
    printed = printed_config("--dataset", "isic2017", "--model", "vit_b", "--epochs", "2", "--loss", "bce")
    assert (printed["image_size"], printed["epochs"], printed["lr"], printed["loss"]) == (1024, 2, 1e-4, "bce")


def test_config_file_sets_every_field(tmp_path, printed_config):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(FILE_VALUES))
    assert printed_config("--config", path) == FILE_VALUES


def test_flags_given_win_over_the_file_for_every_field(tmp_path, printed_config):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(FILE_VALUES))
    printed = printed_config("--config", path, *as_flags(FLAG_VALUES))
    assert printed == {**FLAG_VALUES, "datasets_file": None}


def test_set_gives_any_field_and_a_key_given_twice_is_an_error(tmp_path, printed_config, cli):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"method": "conv-lora", "epochs": 3}))
    printed = printed_config("--config", path, "--set", "epochs=5", "--set", "method_args={rank: 2}",
                             "--set", "flip=false", "--set", "name=007")
    assert (printed["method"], printed["epochs"], printed["method_args"], printed["flip"]) == \
        ("conv-lora", 5, {"rank": 2}, False)
    assert printed["name"] == "007"  # a string field keeps the text, not YAML's number
    code, _, message = cli("run", "--epochs", "2", "--set", "epochs=3", "--print-config")
    assert code == 2 and "epochs is given twice" in message


@pytest.mark.slow
def test_config_file_method_is_the_method_that_trains(tmp_path, data_root):
    """`method: conv-lora` in the file trains Conv-LoRA (the CLI's own defaults never beat the file)."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"method": "conv-lora", "image_size": 64, "epochs": 1, "limit_train": 4,
                                    "limit_eval": 2, "device": "cpu", "out": str(tmp_path / "runs")}))
    proc = samfit("run", "--config", path, "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "shapes_conv-lora_tiny_64_s1"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "conv-lora" and metrics["method_args"]["experts"] == 8
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["method"] == "conv-lora"


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "--device 'tpu': choose one of auto, cpu, cuda."),
    (["--precision", "fp8"], "--precision 'fp8': choose one of"),
    (["--attention", "flash"], "--attention 'flash': choose one of sdpa, reference"),
    (["--loss", "focal"], "--loss 'focal': choose one of"),
    (["--epochs", "0"], "--epochs 0: must be > 0"),
    (["--lr", "-1"], "--lr -1.0: must be > 0"),
    (["--num-workers", "-1"], "--num-workers -1: must be >= 0"),
    (["--batch-size", "3"], "--effective-batch 4 must be a multiple of --batch-size 3"),
    (["--image-size", "100"], "not a positive multiple of 16"),
    (["--method", "lorra"], "Did you mean 'lora'"),
    (["--model", "vit_x"], "--model 'vit_x': choose one of vit_b, vit_l, vit_h, tiny, medsam_vit_b, sam2_hiera_t, "
                           "sam2_hiera_s, sam2_hiera_b+, sam2_hiera_l, sam2_tiny. Did you mean 'vit_l'?"),
    (["--method-arg", "rank=0"], "rank"),
    (["--method-arg", "rank"], "--method-arg 'rank' is not of the form KEY=VALUE"),
    (["--set", "epochs=abc"], "epochs must be an integer, got 'abc'"),
    (["--set", "lr=nan"], "lr must be a number, got 'nan'. It must be finite."),
    (["--set", "flip=maybe"], "flip must be true or false"),
    (["--set", "epoch=3"], "unknown setting 'epoch'. Did you mean 'epochs'?"),
    (["--set", "epochs"], "--set 'epochs' is not of the form KEY=VALUE"),
])
def test_bad_settings_are_one_paragraph_errors(cli, args, message):
    code, _, text = cli("run", *args, "--print-config")
    assert code == 2 and message in text and "\n\n" not in text, text


@pytest.mark.slow
def test_a_bad_setting_prints_its_message_without_a_traceback():
    proc = samfit("run", "--set", "epochs=abc", "--print-config")
    assert proc.returncode == 2 and "epochs must be an integer, got 'abc'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("content, message", [
    ("epochs: [1, 2]\n", "epochs must be an integer, got [1, 2]"),
    ("epoch: 3\n", "unknown setting 'epoch'"),
    ("method_args: rank\n", "method_args must be a mapping"),
    ("device: tpu\n", "--device 'tpu'"),
    ("epochs: 3\n  bad: [\n", "is not valid YAML"),
])
def test_bad_config_files_name_the_file_and_the_key(cli, tmp_path, content, message):
    path = tmp_path / "run.yaml"
    path.write_text(content)
    code, _, text = cli("run", "--config", path, "--print-config")
    assert code == 2 and message in text and str(path) in text, text


def test_cli_options_are_derived_from_the_fields():
    """Every field is an option with its help, choices and default from RunConfig, and no option has a default
    of its own (a flag not given is None, so it cannot override a file)."""
    from samfit.cli import run

    params = {p.name: p for p in run.__signature__.parameters.values()}
    for key, f in FIELDS.items():
        info = params[key].default
        assert info.default is None and option_name(key) in info.param_decls[0], key
        assert f.metadata["help"] in info.help, key
        for choice in allowed_values(key) or ():
            assert choice in info.help, (key, choice)


def test_coercion_follows_the_field_types():
    assert parse_set(["epochs=3", "lr=1e-4", "flip=no", "name=12", "checkpoint=null"]) == \
        {"epochs": 3, "lr": 1e-4, "flip": False, "name": "12", "checkpoint": None}
    assert make_config(None, epochs=3.0).epochs == 3  # YAML's 3.0 is the integer 3
    with pytest.raises(SamfitError, match="epochs must be an integer, got 2.5"):
        make_config(None, epochs=2.5)
    with pytest.raises(SamfitError, match="batch_size must be an integer, got True"):
        RunConfig(batch_size=True)
    assert dataclasses.replace(RunConfig(), lr="0.001").lr == 1e-3
