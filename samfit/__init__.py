"""samfit: benchmark parameter-efficient fine-tuning methods for the Segment Anything Model."""
from samfit.errors import SamfitError
from samfit.methods import get_method, list_methods
from samfit.model import build_model
from samfit.params import count_parameters

__version__ = "0.1.0"
__all__ = ["SamfitError", "build_model", "count_parameters", "get_method", "list_methods", "load_run"]


def __getattr__(name: str):
    """`samfit.load_run`, imported on first use: it needs the training engine, which itself imports samfit."""
    if name == "load_run":
        import importlib

        return importlib.import_module("samfit.use.load").load_run
    raise AttributeError(f"module 'samfit' has no attribute {name!r}")
