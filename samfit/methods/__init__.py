"""PEFT methods: every module in this package registers one method (see base.py); importing the package
imports them all, so `get_method` and `list_methods` see every method."""
import importlib
import pkgutil

from samfit.errors import unknown_name
from samfit.methods.base import REGISTRY, Method, register_method

PAPER = ["decoder-only", "bitfit", "adapter", "sam-adapter", "vpt", "lst", "ssf", "lora", "conv-lora"]
BEYOND = ["full", "ln-tune", "adaptformer", "fact", "dora", "ia3"]  # docs/reference.md, "Beyond the paper's nine"
ORDER = PAPER + BEYOND

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

# the paper's column order first, then the methods beyond it, any user-added method after
_ordered = {n: REGISTRY[n] for n in ORDER if n in REGISTRY}
_ordered.update(REGISTRY)
REGISTRY.clear()
REGISTRY.update(_ordered)


def get_method(name: str, **overrides) -> Method:
    """The method called `name`, configured with `overrides` (validated by its Config)."""
    if name not in REGISTRY:
        raise unknown_name("method", name, REGISTRY)
    return REGISTRY[name](**overrides)


def list_methods() -> list[str]:
    """Registered method names: the paper's nine in its column order, the methods beyond them, then any other."""
    return list(REGISTRY)


__all__ = ["Method", "get_method", "list_methods", "register_method"]
