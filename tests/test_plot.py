"""`samfit plot`: metric vs encoder-side parameters on a log axis (decoder-only at a symbolic 0), error bars, the
Pareto front, labels that do not overlap."""
import numpy as np
import pandas as pd
import pytest

from samfit.report.plot import pareto_front, plot_summary, repel_labels, symbolic_zero

# The paper's nine at their vit_b encoder-side counts; adapter and sam-adapter nearly on top of each other.
METHODS = {"decoder-only": (0, 60.0), "bitfit": (101_376, 70.0), "adapter": (129_096, 72.0),
           "sam-adapter": (139_680, 72.1), "vpt": (110_592, 69.0), "lst": (92_772, 66.0), "ssf": (204_288, 71.0),
           "lora": (110_592, 71.5), "conv-lora": (119_232, 73.0)}


def summary(lower=False) -> pd.DataFrame:
    rows = [{"method": m, "dataset": "polyp", "test_set": "kvasir", "model": "vit_b", "metric": "s_measure",
             "lower_is_better": lower, "mean": score / 100, "std": 0.005, "seeds": 3, "trainable": 3_505_536 + n,
             "encoder_trainable": n, "percent_of_sam": 1.0, "step_time_s": 0.1 + n * 1e-7, "peak_memory_mb": 1.0}
            for m, (n, score) in METHODS.items()]
    return pd.DataFrame(rows)


def test_pareto_front_against_brute_force():
    names = list(METHODS)
    cost = [METHODS[m][0] for m in names]
    score = [METHODS[m][1] for m in names]
    assert [names[i] for i in pareto_front(cost, score)] == ["decoder-only", "lst", "bitfit", "lora", "conv-lora"]
    # lower is better: the same front as higher-is-better on the negated scores
    assert pareto_front(cost, [-s for s in score], lower_is_better=True) == pareto_front(cost, score)
    rng = np.random.default_rng(0)
    for _ in range(20):
        c, s = rng.integers(0, 6, 12).astype(float), rng.integers(0, 6, 12).astype(float)
        brute = {i for i in range(12) if not any((c[j] <= c[i] and s[j] >= s[i]) and (c[j] < c[i] or s[j] > s[i])
                                                 for j in range(12))}
        assert set(pareto_front(c, s)) == brute
    assert pareto_front([1.0, np.nan, 2.0], [1.0, 5.0, 0.5]) == [0]  # NaN never on the front


def test_zero_gets_a_symbolic_position_a_decade_below():
    assert symbolic_zero(np.array([0.0, 36_864.0, 2e5])) == 1e3
    assert symbolic_zero(np.array([36_864.0])) is None


def test_pngs_are_written_with_a_log_axis_and_no_overlapping_labels(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Text

    seen = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(fig, path, *args, **kwargs):
        ax = fig.axes[0]
        renderer = fig.canvas.get_renderer()
        boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]  # the labels, not their leader lines
        seen[path.name] = (ax.get_xscale(), [t.get_text() for t in ax.get_xticklabels()],
                           sum(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), len(boxes))
        return real_savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    paths = plot_summary(summary(), tmp_path)
    assert sorted(p.name for p in paths) == ["polyp_kvasir_s_measure_vs_params.png",
                                             "polyp_kvasir_s_measure_vs_step_time.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in paths)
    scale, ticks, overlaps, labels = seen["polyp_kvasir_s_measure_vs_params.png"]
    assert scale == "log" and ticks[0] == "0" and labels == 9 and overlaps == 0
    assert seen["polyp_kvasir_s_measure_vs_step_time.png"][2] == 0
    plt.close("all")


def test_repel_separates_labels_printed_on_one_spot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    texts = [ax.annotate(name, (1, 1), textcoords="offset points", xytext=(4, 4)) for name in ("adapter",
                                                                                             "sam-adapter", "vpt")]
    fig.canvas.draw()
    assert repel_labels(ax, texts) == 0
    boxes = [t.get_window_extent(fig.canvas.get_renderer()) for t in texts]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(fig)


def test_data_efficiency_curves_and_their_area(tmp_path):
    from samfit.report.plot import fraction_curves

    rows = []
    for fraction, lora, bitfit in ((0.1, 0.5, 0.4), (0.5, 0.7, 0.6), (1.0, 0.8, 0.9)):
        dataset = "polyp" if fraction == 1 else f"polyp@f{fraction:g}"
        for method, score in (("lora", lora), ("bitfit", bitfit)):
            rows.append({"method": method, "dataset": dataset, "test_set": "kvasir", "model": "vit_b",
                         "metric": "s_measure", "lower_is_better": False, "mean": score, "std": 0.01, "seeds": 2,
                         "trainable": 1, "encoder_trainable": 1, "percent_of_sam": 1.0, "step_time_s": 0.1,
                         "peak_memory_mb": 1.0})
    frame = pd.DataFrame(rows)
    curves = fraction_curves(frame).set_index("method")
    assert curves.loc["lora", "fractions"] == [0.1, 0.5, 1.0]
    # trapezoid by hand: (0.4 * 0.6 + 0.5 * 0.75) / 0.9
    assert curves.loc["lora", "auc"] == pytest.approx((0.4 * 0.6 + 0.5 * 0.75) / 0.9)
    assert curves.loc["bitfit", "auc"] == pytest.approx((0.4 * 0.5 + 0.5 * 0.75) / 0.9)
    paths = plot_summary(frame, tmp_path)
    assert (tmp_path / "polyp_kvasir_s_measure_vs_fraction.png") in paths
    assert fraction_curves(summary()).empty  # one fraction: no curve
