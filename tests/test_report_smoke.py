"""The smoke grid end to end: real tiny runs on `shapes` (three methods, two seeds, train fractions 0.5 and 1)
through `samfit compare` (verdicts, areas under the fraction curve, ranks, the CD diagram, --rope), `samfit table
--baseline`, `samfit plot` and `samfit report`, the page rendered by headless chromium when there is one."""
import itertools
import json

import numpy as np
import pytest

from test_report_html import CHROMIUM, check_rendered, render

METHODS = ("decoder-only", "bitfit", "lora")
GRID = dict(model="tiny", dataset="shapes", device="cpu", image_size=64, epochs=1, limit_train=8, limit_eval=12,
            batch_size=4, effective_batch=4)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """12 runs in this process (a subprocess per run would spend most of its time importing torch), on one
    thread (about 1 s a run; two threads on a busy 2-core machine took 15)."""
    import torch

    from samfit.config import make_config
    from samfit.engine.train import run

    root = tmp_path_factory.mktemp("smoke")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method, seed, fraction in itertools.product(METHODS, (0, 1), (0.5, 1.0)):
            run(make_config(None, method=method, seed=seed, train_fraction=fraction, out=str(root / "runs"),
                            data_root=str(root / "data"), **GRID), quiet=True)
    finally:
        torch.set_num_threads(threads)
    return root / "runs"


@pytest.mark.slow
def test_smoke_grid_through_compare_table_plot_and_report(cli, grid, tmp_path):
    code, out, message = cli("compare", grid, "--baseline", "lora", "--format", "json", "--resamples", "300")
    assert code == 0, message
    records = json.loads(out)
    keys = {(r["dataset"], r["metric"], r["method"]) for r in records}
    assert keys == {(d, m, x) for x in ("decoder-only", "bitfit") for d, m in
                    (("shapes", "iou_per_image"), ("shapes@f0.5", "iou_per_image"), ("shapes", "iou_per_image@area"))}
    for r in records:
        assert r["seeds"] == [0, 1] and r["n_images"] == 12, r
        assert all(np.isfinite(r[k]) for k in ("difference", "ci_low", "ci_high", "p_value", "p_holm")), r
        assert r["verdict"] in ("better", "worse", "no detectable difference")
    area = next(r for r in records if r["metric"].endswith("@area"))
    assert area["fractions"] == [0.5, 1.0]

    cd = tmp_path / "cd.png"
    code, out, message = cli("compare", grid, "--format", "markdown", "--resamples", "300", "--rope", "0.5",
                             "--cd-diagram", cd)
    assert code == 0 and cd.stat().st_size > 1000, message
    assert "Friedman test over 2 test sets and 3 methods" in out and "P(better)" in out

    code, out, message = cli("table", grid, "--baseline", "lora", "--format", "markdown")
    assert code == 0 and "▲ / ▼" in out and all(m in out for m in METHODS), message

    plots = tmp_path / "plots"
    code, out, message = cli("plot", grid, "--out", plots)
    assert code == 0, message
    assert (plots / "shapes_iou_per_image_vs_fraction.png").is_file() and len(list(plots.glob("*.png"))) == 5

    page = tmp_path / "report.html"
    code, _, message = cli("report", grid, "--out", page, "--resamples", "300", "--rope", "0.5")
    assert code == 0, message
    if CHROMIUM is None:
        pytest.skip("no chromium binary on PATH: the page was written but not rendered")
    dom, log = render(page, tmp_path)
    check_rendered(dom, log, METHODS, ["shapes", "shapes@f0.5"], len(records))
