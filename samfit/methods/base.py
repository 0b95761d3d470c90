"""The contract every PEFT method keeps, and the registry methods join by decorating themselves.

A method is a small class with a `Config` dataclass of hyperparameters (the defaults of docs/reference.md),
which checks its own values in `__post_init__` with the `require_*` helpers below, and an `inject(model)`
that inserts or unfreezes its trainable parts in the (already frozen) Segmenter. It knows nothing of data
or training. `apply(model)` = freeze SAM except the cut decoder, then `inject`.
Layers that produce an auxiliary loss store it in `self.aux_loss` during forward; the Segmenter sums them.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
import typing
from typing import ClassVar

from torch import nn

from samfit.errors import SamfitError, closest

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
    encoder_side: ClassVar[bool] = True  # trains something in the encoder (False: nothing left with a frozen decoder)
    unfreezes: ClassVar[tuple[str, ...]] = ()  # fnmatch patterns of SAM's own encoder weights made trainable
    # what the backbone's encoder must offer (samfit/model/backbones.py FEATURES); without it, no faithful form
    requires: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, **overrides):
        valid = {f.name: f for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(overrides) - set(valid))
        if BLOCKS in unknown:
            placeable = [n for n, m in REGISTRY.items() if BLOCKS in {f.name for f in dataclasses.fields(m.Config)}]
            raise SamfitError(
                f"--method-arg {BLOCKS}={show(overrides[BLOCKS])} for method '{self.name}': this method takes no "
                f"placement (its trainable parts are not layers inside chosen encoder blocks). Methods that take "
                f"{BLOCKS}=: {', '.join(placeable)}."
            )
        if unknown:
            raise SamfitError(
                f"Unknown --method-arg {', '.join(unknown)} for method '{self.name}'. "
                f"Valid keys: {', '.join(valid) or '(none: this method has no hyperparameters)'}."
            )
        hints = typing.get_type_hints(self.Config)
        values = {k: _coerce(self.name, k, v, hints[k], self.Config) for k, v in overrides.items()}
        self.config = self.Config(**values)

    def apply(self, model: nn.Module) -> nn.Module:
        """Freeze SAM except the cut mask decoder, then insert this method's trainable parts."""
        check_applies(self, model.variant)
        model.freeze_for_finetuning()
        self.inject(model)
        model.method_name = self.name
        return model

    def inject(self, model: nn.Module) -> None:
        """Insert or unfreeze the method's trainable parts in model.image_encoder (subclasses)."""

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the trained parts into SAM's own weights, in place: afterwards the image encoder holds only SAM's
        module types (segment_anything / torch.nn) and computes the same function. Mergeable methods override
        this; the others cannot be folded into SAM's weights."""
        if not self.mergeable:
            raise SamfitError(
                f"Method '{self.name}' cannot be merged into SAM's weights: its layers compute something plain "
                f"SAM cannot. Keep the run folder (samfit.load_run, samfit predict) or export its trained "
                f"parameters with `samfit export RUN --format adapter`.")
        raise TypeError(f"{type(self).__name__} declares mergeable = True but defines no merge()")

    def describe(self) -> dict:
        return dataclasses.asdict(self.config)

    def block_indices(self, model: nn.Module) -> list[int]:
        """The encoder blocks this method goes into: its `blocks` placement checked against the model's depth
        (every block for a method without placement)."""
        depth = len(encoder_blocks(model))
        return select_blocks(self.name, getattr(self.config, BLOCKS, "all"), depth)

    def selected_blocks(self, model: nn.Module) -> list[nn.Module]:
        blocks = encoder_blocks(model)
        return [blocks[i] for i in self.block_indices(model)]

    def places_everywhere(self) -> bool:
        """True for the default placement (every block; parts outside the blocks included)."""
        return getattr(self.config, BLOCKS, "all") == "all"


class NotApplicable(SamfitError):
    """The method has no faithful form on the model's backbone (tables show "n/a")."""


def missing_features(method: type[Method] | Method, model: str) -> list[str]:
    """The encoder features `method` requires that backbone `model` lacks (empty: the method applies)."""
    from samfit.model.backbones import get_backbone

    return sorted(method.requires - get_backbone(model).features)


def check_applies(method: Method, model: str) -> None:
    """A NotApplicable error naming what the backbone lacks, when the method does not apply to it."""
    from samfit.model.backbones import BACKBONES, FEATURES

    missing = missing_features(method, model)
    if missing:
        ok = [n for n in BACKBONES if not missing_features(method, n)]
        raise NotApplicable(
            f"Method '{method.name}' has no faithful form on --model {model}: it needs "
            f"{'; '.join(FEATURES[f] for f in missing)}, which {model}'s encoder does not have. It runs on "
            f"{', '.join(ok)}; see `samfit methods --model {model}` for the methods that apply (in a grid file, "
            f"leave the pair out with exclude: [{{method: {method.name}, model: {model}}}]).")


def _coerce(method: str, key: str, value, kind, config: type):
    """Turn a --method-arg string into the field's type (int, float, bool, str, tuple of ints)."""
    if not isinstance(value, str):
        return value
    try:
        if kind is bool:
            if value.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(value)
            return value.lower() in {"true", "1", "yes"}
        if typing.get_origin(kind) is tuple:
            return tuple(int(x) for x in value.strip("()[] ").replace(",", " ").split())
        return kind(value)
    except ValueError:
        kinds = {bool: "bool (true or false; also yes/no, 1/0)", int: "int", float: "float"}
        expected = "tuple of ints (comma-separated)" if typing.get_origin(kind) is tuple else kinds.get(kind, kind)
        raise SamfitError(
            f"--method-arg {key}={value} for method '{method}': expected a value of type {expected}; "
            f"the default is {key}={show(getattr(config(), key))}."
        ) from None


def show(value) -> str:
    """A value as it is written on the command line (tuples comma-separated)."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def invalid(method: str, key: str, value, expected: str, hint: str = "") -> SamfitError:
    """The error for a --method-arg outside its valid range: names the method, the key and the range."""
    return SamfitError(f"--method-arg {key}={show(value)} for method '{method}': must be {expected}.{hint}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def require_int(method: str, key: str, value, minimum: int = 1, maximum: int | None = None, note: str = "") -> int:
    """`value` as an int in [minimum, maximum] (no bools, no floats), else a SamfitError."""
    ok = _is_int(value) and minimum <= value and (maximum is None or value <= maximum)
    if not ok:
        span = f"of at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise invalid(method, key, value, f"an integer {span}{note}")
    return int(value)


def require_float(method: str, key: str, value, low: float | None = None, high: float | None = None,
                  include_low: bool = True, include_high: bool = True) -> float:
    """`value` as a finite float within the bounds (each inclusive or not), else a SamfitError."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low is None or value > low or (include_low and value == low))
    ok = ok and (high is None or value < high or (include_high and value == high))
    if not ok:
        if low is not None and high is not None:
            span = f"in {'[' if include_low else '('}{low:g}, {high:g}{']' if include_high else ')'}"
        elif low is not None:
            span = f"{'>=' if include_low else '>'} {low:g}"
        elif high is not None:
            span = f"{'<=' if include_high else '<'} {high:g}"
        else:
            span = ""
        raise invalid(method, key, value, f"a finite number {span}".rstrip())
    return float(value)


def require_bool(method: str, key: str, value) -> bool:
    if not isinstance(value, bool):
        raise invalid(method, key, value, "true or false")
    return value


def require_choice(method: str, key: str, value, choices) -> str:
    if value not in choices:
        hint = closest(value, choices) if isinstance(value, str) else ""
        raise invalid(method, key, value, f"one of {', '.join(map(str, choices))}", hint)
    return value


def require_ints(method: str, key: str, value, minimum: int = 0, unique: bool = False) -> tuple[int, ...]:
    """`value` as a tuple of ints >= minimum (distinct if `unique`), e.g. a list of block indices."""
    ok = isinstance(value, (tuple, list)) and all(_is_int(v) and v >= minimum for v in value)
    if not ok or (unique and len(set(value)) != len(value)):
        what = "distinct integers" if unique else "integers"
        raise invalid(method, key, value, f"a comma-separated list of {what} of at least {minimum}")
    return tuple(int(v) for v in value)


def encoder_blocks(model) -> nn.ModuleList:
    return model.image_encoder.blocks


# ------------------------------------------------------------------ placement: which blocks a method goes into
BLOCKS = "blocks"
PLACEMENTS = "all, last:K, first:K, or distinct block indices i,j,k"


def require_blocks(method: str, key: str, value) -> str:
    """A placement's syntax (the depth is checked at apply time, `select_blocks`), normalised: "all",
    "last:K", "first:K" (K >= 1) or "i,j,k" (distinct indices >= 0, in the given order)."""
    text = value.replace(" ", "").lower() if isinstance(value, str) else None
    if text == "all":
        return text
    match = re.fullmatch(r"(last|first):(\d+)", text or "")
    if match and int(match[2]) >= 1:
        return f"{match[1]}:{int(match[2])}"
    if text and re.fullmatch(r"\d+(,\d+)*", text):
        indices = [int(i) for i in text.split(",")]
        if len(set(indices)) == len(indices):
            return ",".join(map(str, indices))
    raise invalid(method, key, value, f"{PLACEMENTS} (K >= 1), given as a string, e.g. {key}=last:3")


def select_blocks(method: str, value: str, depth: int, key: str = BLOCKS) -> list[int]:
    """The block indices (ascending) a normalised placement selects in an encoder of `depth` blocks."""
    value = require_blocks(method, key, value)
    if value == "all":
        return list(range(depth))
    where, _, count = value.partition(":")
    if where in ("last", "first") and int(count) <= depth:
        k = int(count)
        return list(range(depth - k, depth)) if where == "last" else list(range(k))
    if where not in ("last", "first") and all(int(i) < depth for i in value.split(",")):
        return sorted(int(i) for i in value.split(","))
    raise invalid(method, key, value, f"all, last:K or first:K with K from 1 to {depth}, or distinct block "
                                      f"indices from 0 to {depth - 1} (this encoder has {depth} blocks)")


def placement_config(method: str) -> type:
    """The Config of a method whose only hyperparameter is its placement."""

    @dataclasses.dataclass
    class PlacementConfig:
        blocks: str = "all"  # all | last:K | first:K | i,j,k

        def __post_init__(self):
            self.blocks = require_blocks(method, BLOCKS, self.blocks)

    PlacementConfig.__qualname__ = PlacementConfig.__name__ = f"PlacementConfig[{method}]"
    return PlacementConfig


def replace_modules(model: nn.Module, kind: type, make) -> nn.Module:
    """Replace every module of type `kind` inside `model` by `make(module)` (in place); returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, kind):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, make(module))
    return model
