"""Using a trained run: load it (`load_run`), segment new images (`samfit predict`), score it on another dataset
(`samfit evaluate`), export it as a plain SAM checkpoint (`samfit export`)."""
from samfit.use.load import load_run

__all__ = ["load_run"]
