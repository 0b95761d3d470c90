"""PEFT methods: every module in this package registers one method (see base.py)."""
import importlib
import pkgutil

from samfit.methods.base import REGISTRY, Method, get_method, list_methods, register_method

ORDER = ["decoder-only", "bitfit", "adapter", "sam-adapter", "vpt", "lst", "ssf", "lora", "conv-lora"]

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

# the paper's column order first, any user-added method after
_ordered = {n: REGISTRY[n] for n in ORDER if n in REGISTRY}
_ordered.update(REGISTRY)
REGISTRY.clear()
REGISTRY.update(_ordered)

__all__ = ["Method", "get_method", "list_methods", "register_method"]
