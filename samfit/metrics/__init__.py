"""Evaluation metrics: binary (IoU, Dice, BER), SOD (S, E, weighted F, MAE), multi-class (mIoU)."""
from samfit.metrics.binary import BinaryEvaluator, evaluate_binary
from samfit.metrics.multiclass import MulticlassEvaluator, evaluate_multiclass

__all__ = ["BinaryEvaluator", "MulticlassEvaluator", "evaluate_binary", "evaluate_multiclass"]
