"""samfit: benchmark parameter-efficient fine-tuning methods for the Segment Anything Model."""
from samfit.errors import SamfitError
from samfit.methods import get_method, list_methods
from samfit.model import build_model
from samfit.params import count_parameters
from samfit.use.load import load_run

__version__ = "0.1.0"
__all__ = ["SamfitError", "build_model", "count_parameters", "get_method", "list_methods", "load_run"]

