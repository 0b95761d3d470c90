"""The contract every PEFT method keeps, and the registry methods join by decorating themselves.

A method is a small class with a `Config` dataclass of hyperparameters (the REFERENCE §2 defaults) and an
`inject(model)` that inserts or unfreezes its trainable parts in the (already frozen) Segmenter. It knows
nothing of data or training. `apply(model)` = freeze SAM except the cut decoder, then `inject`.
Layers that produce an auxiliary loss store it in `self.aux_loss` during forward; the Segmenter sums them.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import ClassVar

from torch import nn

from samfit.errors import SamfitError, unknown_name

REGISTRY: dict[str, type["Method"]] = {}


def register_method(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make a method available by its `name`."""
    REGISTRY[cls.name] = cls
    return cls


@dataclasses.dataclass
class NoConfig:
    """A method without hyperparameters."""


class Method:
    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    identical_at_init: ClassVar[bool] = False  # model output equals plain SAM's before training
    mergeable: ClassVar[bool] = False  # can be folded into SAM's weights after training

    def __init__(self, **overrides):
        valid = {f.name: f for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise SamfitError(
                f"Unknown --method-arg {', '.join(unknown)} for method '{self.name}'. "
                f"Valid keys: {', '.join(valid) or '(none: this method has no hyperparameters)'}."
            )
        hints = typing.get_type_hints(self.Config)
        values = {k: _coerce(self.name, k, v, hints[k]) for k, v in overrides.items()}
        self.config = self.Config(**values)

    def apply(self, model: nn.Module) -> nn.Module:
        """Freeze SAM except the cut mask decoder, then insert this method's trainable parts."""
        model.freeze_for_finetuning()
        self.inject(model)
        model.method_name = self.name
        return model

    def inject(self, model: nn.Module) -> None:
        """Insert or unfreeze the method's trainable parts in model.image_encoder (subclasses)."""

    def describe(self) -> dict:
        return dataclasses.asdict(self.config)


def _coerce(method: str, key: str, value, kind):
    """Turn a --method-arg string into the field's type (int, float, bool, str, tuple of ints)."""
    if not isinstance(value, str):
        return value
    try:
        if kind is bool:
            if value.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(value)
            return value.lower() in {"true", "1", "yes"}
        if typing.get_origin(kind) is tuple:
            return tuple(int(x) for x in value.replace(",", " ").split())
        return kind(value)
    except ValueError:
        raise SamfitError(
            f"--method-arg {key}={value} for method '{method}': expected a value of type "
            f"{getattr(kind, '__name__', kind)}."
        ) from None


def parse_method_args(pairs: list[str]) -> dict[str, str]:
    """['rank=4', 'alpha=16'] -> {'rank': '4', 'alpha': '16'}."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SamfitError(f"--method-arg '{pair}' is not of the form key=value (e.g. --method-arg rank=4).")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def get_method(name: str, **overrides) -> Method:
    from samfit import methods  # noqa: F401  (imports every method module so they register)

    if name not in REGISTRY:
        raise unknown_name("method", name, REGISTRY)
    return REGISTRY[name](**overrides)


def list_methods() -> list[str]:
    from samfit import methods  # noqa: F401

    return list(REGISTRY)


def encoder_blocks(model) -> nn.ModuleList:
    return model.image_encoder.blocks
