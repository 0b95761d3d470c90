"""SOD metrics on PySODMetrics' own test images equal the values PySODMetrics records for them
(examples/version_performance.json, v1.4.x, read with cv2 as 8-bit grey maps), independently of the version
installed here. The predictions reach samfit as probabilities p = u / 255 of the 8-bit maps, as a saved
prediction PNG gives them; samfit hands PySODMetrics round(255·p) = u, exactly the map its users give it."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from samfit.metrics import BinaryEvaluator

DATA = Path(__file__).parent / "data" / "pysodmetrics"
RECORDED = {  # PySODMetrics' examples/version_performance.json, v1_4_0 .. v1_4_3 (identical)
    "s_measure": 0.9029761578759272,
    "weighted_f": 0.5579812753638986,
    "mae": 0.03705558476661653,
    "e_measure_adaptive": 0.9408760066970617,
    "e_measure_mean": 0.9566258293508704,
    "e_measure_max": 0.9669544828922699,
}


def test_sod_metrics_equal_the_values_pysodmetrics_records_for_its_own_images():
    evaluator = BinaryEvaluator(sod=True)
    names = sorted(p.name for p in (DATA / "masks").glob("*.png"))
    assert names == ["0001.png", "19.png", "aerial-1867541__340.png"]
    for name in names:
        gt = cv2.imread(str(DATA / "masks" / name), cv2.IMREAD_GRAYSCALE)
        pred = cv2.imread(str(DATA / "preds" / name), cv2.IMREAD_GRAYSCALE)
        evaluator.update(pred.astype(np.float64) / 255.0, gt)
    scores = evaluator.compute()
    for key, value in RECORDED.items():
        assert scores[key] == pytest.approx(value, abs=1e-6), key
