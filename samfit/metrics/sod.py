"""Salient/camouflaged-object metrics: S-measure, E-measure, weighted F-measure, MAE.

All four come from PySODMetrics (`py_sod_metrics`), the field's reference implementation, fed exactly what
its users feed it: the prediction as the 8-bit map a saved prediction PNG holds, round(255·p) at the GT's
resolution (`to_uint8_map`), which PySODMetrics itself min-max normalises (MATLAB's `mapminmax(im2double(.))`);
the GT as a 0/255 map that PySODMetrics binarises at > 128. samfit does not normalise the map first: a
normalised-then-rounded map differs from the saved one by rounding, enough to flip pixels at E_φ's adaptive
threshold. Every score is a mean over images.

- S_alpha (Fan et al., ICCV 2017), alpha = 0.5; an empty quadrant counts 0 where PySODMetrics gives NaN.
- E_phi (Fan et al., IJCAI 2018): PySODMetrics gives a 256-point curve per image (thresholds 0..255); the
  dataset curve is its mean over images; `e_measure_mean` = mean of that curve over the 256 thresholds,
  `e_measure_max` = its maximum, `e_measure_adaptive` = mean over images of E at threshold 2·mean(pred).
  Like the authors' MATLAB code, PySODMetrics divides the enhanced-alignment sum by (n_pixels − 1), so E
  can exceed 1 by up to 1/(n_pixels − 1): negligible on real images, absurd on a 1-pixel one.
- F^w_beta (Margolin et al., CVPR 2014): `weighted_f` with β² = 1 as in PySODMetrics and the authors' MATLAB
  code; `weighted_f_beta2_0.3` with β² = 0.3, the official Conv-LoRA code's `WeightedFmeasure(beta=0.3)`
  (PySODMetrics' `beta` argument is β²). An image with an empty GT scores 0 (PySODMetrics' convention).
- MAE (Perazzi et al., CVPR 2012) of the normalised map against the binary GT.

On PySODMetrics' own inputs (an 8-bit map u, given to samfit as p = u/255) samfit passes u unchanged, so every
score equals PySODMetrics' to the last bit.
"""
from __future__ import annotations

import numpy as np
import py_sod_metrics as pysod


OFFICIAL_WF_BETA2 = 0.3  # the official Conv-LoRA code's WeightedFmeasure(beta=0.3), i.e. β² = 0.3


def to_uint8_map(pred: np.ndarray) -> np.ndarray:
    """The 8-bit map of a probability map p in [0, 1]: round(255·p) (ties to even), as a prediction PNG
    holds it. No min-max normalisation here: PySODMetrics applies its own (a constant map stays constant)."""
    return np.rint(np.asarray(pred, np.float64) * 255.0).astype(np.uint8)


class _Smeasure(pysod.Smeasure):
    """PySODMetrics' S-measure, except that an empty quadrant (a GT centroid on the last row or column,
    hence weight 0) adds 0 to the region score instead of making it NaN; otherwise identical."""

    def ssim(self, pred: np.ndarray, gt: np.ndarray) -> float:
        return 0.0 if pred.size == 0 else super().ssim(pred, gt)


class SODAccumulator:
    """Streams (pred, gt) pairs through PySODMetrics and keeps only its per-image scores."""

    def __init__(self, weighted_f_beta: float = 1.0):
        self.weighted_f_beta = weighted_f_beta
        self._s = _Smeasure()
        self._e = pysod.Emeasure()
        self._wf = pysod.WeightedFmeasure(beta=weighted_f_beta)
        self._wf_official = pysod.WeightedFmeasure(beta=OFFICIAL_WF_BETA2)
        self._mae = pysod.MAE()

    def update(self, pred: np.ndarray, gt_positive: np.ndarray) -> None:
        """`pred`: float map in [0, 1]; `gt_positive`: bool map of the same shape."""
        pred_u8 = to_uint8_map(pred)
        gt_u8 = gt_positive.astype(np.uint8) * 255
        for metric in (self._s, self._e, self._wf, self._wf_official, self._mae):
            metric.step(pred=pred_u8, gt=gt_u8)

    def state(self) -> dict:
        """The per-image scores, as plain lists (picklable, concatenable across processes)."""
        return {
            "weighted_f_beta": self.weighted_f_beta,
            "s": [float(v) for v in self._s.sms],
            "e_adaptive": [float(v) for v in self._e.adaptive_ems],
            "e_curve": [np.asarray(c, dtype=np.float64) for c in self._e.changeable_ems],
            "weighted_f": [float(v) for v in self._wf.weighted_fms],
            "weighted_f_official": [float(v) for v in self._wf_official.weighted_fms],
            "mae": [float(v) for v in self._mae.maes],
        }

    @classmethod
    def from_states(cls, states: list[dict]) -> "SODAccumulator":
        acc = cls(weighted_f_beta=states[0]["weighted_f_beta"] if states else 1.0)
        for st in states:
            acc._s.sms.extend(st["s"])
            acc._e.adaptive_ems.extend(st["e_adaptive"])
            acc._e.changeable_ems.extend(st["e_curve"])
            acc._wf.weighted_fms.extend(st["weighted_f"])
            acc._wf_official.weighted_fms.extend(st["weighted_f_official"])
            acc._mae.maes.extend(st["mae"])
        return acc

    def __len__(self) -> int:
        return len(self._mae.maes)

    def per_image(self) -> dict[str, np.ndarray]:
        """Each image's scores (their means over images are `compute()`'s, `e_measure_max` aside)."""
        curves = self.curves()
        return {"s_measure": np.array(self._s.sms, dtype=np.float64),
                "e_measure_mean": curves.mean(axis=1) if len(curves) else np.zeros(0),
                "e_measure_adaptive": np.array(self._e.adaptive_ems, dtype=np.float64),
                "weighted_f": np.array(self._wf.weighted_fms, dtype=np.float64),
                "weighted_f_beta2_0.3": np.array(self._wf_official.weighted_fms, dtype=np.float64),
                "mae": np.array(self._mae.maes, dtype=np.float64)}

    def curves(self) -> np.ndarray:
        """(images, 256): each image's E_φ curve; `e_measure_max` is the maximum of their mean."""
        return np.array(self._e.changeable_ems, dtype=np.float64).reshape(len(self), -1)

    def curve_columns(self) -> dict[str, np.ndarray]:
        curves = self.curves()
        return {f"e_curve_{t:03d}": curves[:, t] for t in range(curves.shape[1])}

    def compute(self) -> dict[str, float]:
        em = self._e.get_results()["em"]
        curve = np.asarray(em["curve"], dtype=np.float64)
        return {
            "s_measure": float(self._s.get_results()["sm"]),
            "e_measure_mean": float(curve.mean()),
            "e_measure_adaptive": float(em["adp"]),
            "e_measure_max": float(curve.max()),
            "weighted_f": float(self._wf.get_results()["wfm"]),
            "weighted_f_beta2_0.3": float(self._wf_official.get_results()["wfm"]),
            "mae": float(self._mae.get_results()["mae"]),
        }
