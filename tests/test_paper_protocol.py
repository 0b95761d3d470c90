"""`table --paper` by protocol: the published numbers are compared with the runs of `--protocol official`, in the
columns computed the paper's way; rows of samfit's protocol are kept apart (never averaged with official runs),
marked, and get no Δ; with no official run, Δ falls back to samfit's and a note says the recipes differ."""
from __future__ import annotations

import io
import json

import pandas as pd
import pytest
from test_paper_conventions import fake_run

from samfit.report import collect_runs, comparison_grid, summarise
from samfit.report.paper import add_paper, load_reference


def with_protocol(root, protocol, method, dataset, seed, scores, headline, lower=False):
    """A run folder as fake_run writes it, with metrics.json's `protocol` as the engine records it."""
    fake_run(root / protocol, method, dataset, seed, scores, headline, lower)
    path = root / protocol / f"{dataset}_{method}_vit_h_1024_s{seed}" / "metrics.json"
    metrics = json.loads(path.read_text())
    path.write_text(json.dumps({**metrics, "protocol": protocol}))


def paper_grid(root):
    frame = collect_runs(root)
    summary = summarise(frame)
    grid, notes = add_paper(comparison_grid(summary), summary, load_reference(), runs=frame)
    return grid.set_index(["method", "model"]), notes


@pytest.fixture
def mixed(tmp_path):
    for seed in range(2):
        with_protocol(tmp_path, "samfit", "lora", "sbu", seed, {"test": {"ber": 3.0, "ber_per_image": 5.0}}, "ber",
                      True)
        with_protocol(tmp_path, "official", "lora", "sbu", seed,
                      {"test": {"ber": 2.0 + seed, "ber_per_image": 2.5 + seed}}, "ber", True)
    return tmp_path


def test_mixed_protocols_are_two_marked_rows_and_only_the_official_one_is_compared(mixed):
    grid, notes = paper_grid(mixed)
    assert sorted(grid.index) == [("lora", "vit_h"), ("lora", "vit_h (official)")]  # never averaged together
    assert grid["protocol"].to_dict() == {("lora", "vit_h"): "samfit", ("lora", "vit_h (official)"): "official"}
    assert grid.loc[("lora", "vit_h"), "sbu ber"].startswith("3.00 ")  # samfit's runs alone
    assert grid.loc[("lora", "vit_h (official)"), "sbu ber"].startswith("2.50 ± 0.71")  # mean, sample std of 2, 3
    assert list(grid["sbu ber paper"]) == ["2.74", "2.74"]
    delta = grid["sbu ber Δ vs ber_per_image"]  # the official rows' ber_per_image (3.0), the paper's BER
    assert delta.to_dict() == {("lora", "vit_h"): "—", ("lora", "vit_h (official)"): f"{3.0 - 2.74:+.2f}"}
    assert any("1 row(s) of the official protocol" in n and "1 row(s) of samfit's protocol show the paper's value "
               "without Δ" in n for n in notes)


def test_only_samfit_runs_are_compared_and_the_note_says_the_recipe_differs(tmp_path):
    for seed in range(2):
        with_protocol(tmp_path, "samfit", "lora", "sbu", seed, {"test": {"ber": 3.0, "ber_per_image": 4.0}}, "ber",
                      True)
    grid, notes = paper_grid(tmp_path)
    assert list(grid["protocol"]) == ["samfit"] and list(grid["sbu ber Δ vs ber_per_image"]) == [f"{4.0 - 2.74:+.2f}"]
    assert any(n.startswith("no row here ran --protocol official") for n in notes)


def test_runs_recorded_before_protocols_count_as_samfit(tmp_path):
    fake_run(tmp_path, "lora", "sbu", 0, {"test": {"ber": 3.0}}, "ber", True)  # a metrics.json without `protocol`
    frame = collect_runs(tmp_path)
    assert list(frame["protocol"]) == ["samfit"] and list(frame["model"]) == ["vit_h"]


@pytest.mark.slow
def test_table_paper_on_real_runs_of_both_protocols(tmp_path, data_root, one_thread, cli):
    """Two tiny runs on `shapes`, one per protocol, against a reference that publishes a shapes number computed
    as dice_per_image: Δ is the official run's dice_per_image minus it, read from its own metrics.json."""
    from samfit.config import make_config
    from samfit.engine.train import run

    folders = {}
    for protocol in ("samfit", "official"):
        cfg = make_config(None, protocol=protocol, dataset="shapes", image_size=64, epochs=1, limit_train=4,
                          limit_eval=4, effective_batch=4, device="cpu", out=str(tmp_path / "runs"))
        folders[protocol] = run(cfg, quiet=True)
    reference = tmp_path / "reference.csv"
    reference.write_text("dataset,test_set,metric,method,value,source,computed_as\n"
                         "shapes,test,iou_per_image,lora,12.5,a test's number,dice_per_image\n")
    code, stdout, message = cli("table", tmp_path / "runs", "--paper", "--reference", reference, "--format", "csv")
    assert code == 0, message
    frame = pd.read_csv(io.StringIO(stdout), dtype=str).set_index("model")
    assert frame["protocol"].to_dict() == {"tiny": "samfit", "tiny (official)": "official"}
    official = json.loads((folders["official"] / "metrics.json").read_text())["scores"]["test"]["dice_per_image"]
    assert frame["shapes iou_per_image Δ vs dice_per_image"].to_dict() == {
        "tiny": "—", "tiny (official)": f"{100 * official - 12.5:+.2f}"}
    assert frame.loc["tiny (official)", "paper source"] == "a test's number"
