"""RunConfig: everything one run needs, and the one place its settings are declared.

Every field carries its help text and, where it has them, its allowed values and lower bound (`setting()`).
The CLI options of `samfit run`, `--config` files, grid files, `--set KEY=VALUE` and validation are all derived
from these fields. Precedence, lowest first: the defaults here < the dataset's defaults in datasets.yaml (they
fill only fields left unset, None: image_size, epochs, lr, loss) < a `--config` file < flags given on the
command line (a flag not given never overrides the file). The protocol (`samfit` or `official`) is a named bundle
of settings: when a RunConfig is made, it fills the fields of PROTOCOL_SETTINGS left unset (None), and in
`resolved` it turns the dataset's default loss into its own form (`losses.protocol_loss`); a value given in a
file or a flag always wins.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from samfit.errors import SamfitError, closest
from samfit.keyvalue import parse_pairs

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
EVAL_RESOLUTIONS = ("gt", "model")
CACHE_MODES = ("auto", "on", "off")
CACHE_DTYPES = ("fp32", "bf16", "fp16")
PROTOCOLS = ("samfit", "official")
DECAY_EXCLUDES = ("none", "bias-norm")
HEADS = ("samfit", "official")
# What each protocol gives the settings left unset (docs/reference.md, Differences from the official code).
PROTOCOL_SETTINGS = {
    "samfit": {"batch_size": 4, "eval_resolution": "gt", "decay_exclude": "none", "head": "samfit"},
    "official": {"batch_size": 1, "eval_resolution": "model", "decay_exclude": "bias-norm", "head": "official"},
}


def _attention_kinds() -> tuple[str, ...]:
    from samfit.model.attention import ATTENTION_KINDS

    return ATTENTION_KINDS


def _model_names() -> tuple[str, ...]:
    from samfit.model.backbones import BACKBONES

    return tuple(BACKBONES)


def _loss_names() -> tuple[str, ...]:
    from samfit.losses import LOSSES, MULTICLASS_LOSSES

    return (*LOSSES, *MULTICLASS_LOSSES)


def setting(default, help: str, choices=None, minimum=None, positive=False, flag: str | None = None):
    """A RunConfig field: its default, help text, allowed values (a tuple, or a function returning one, read
    lazily) and bounds (`minimum` inclusive, `positive` for > 0). `flag` renames the CLI option."""
    meta = {"help": help, "choices": choices, "minimum": minimum, "positive": positive, "flag": flag}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    method: str = setting("lora", "PEFT method (see `samfit methods`).")
    dataset: str = setting("shapes", "Registry name (see `samfit datasets`), a folder in the canonical layout, "
                                     "or a CSV of image,label pairs.")
    protocol: str = setting("samfit", "Recipe: samfit's own, or the official Conv-LoRA code's (official: loss "
                                      "structure-official, batch 1 accumulated to 4, no weight decay on biases and "
                                      "norms, scored at the input size, the official multi-class head); fills "
                                      "only the settings not given.",
                            choices=PROTOCOLS)
    model: str = setting("tiny", "Backbone: a SAM variant, medsam_vit_b or a SAM 2.1 size (tiny, sam2_tiny: random "
                                 "weights, for tests and smoke runs; docs/reference.md, Backbones).",
                         choices=_model_names)
    checkpoint: str | None = setting(None, "SAM checkpoint file (default: the official file in "
                                           "$SAMFIT_CHECKPOINTS).")
    image_size: int | None = setting(None, "Input size, a multiple of 16 (SAM) or 32 (SAM 2) (default: the "
                                                   "dataset's; tiny: 128).",
                                     positive=True)
    epochs: int | None = setting(None, "Epochs (default: the dataset's).", positive=True)
    lr: float | None = setting(None, "Peak learning rate (default: the dataset's).", positive=True)
    batch_size: int | None = setting(None, "Images per forward pass (default: the protocol's, samfit 4, "
                                           "official 1).", positive=True)
    effective_batch: int = setting(4, "Images per optimiser step (gradient accumulation), a multiple of "
                                      "batch_size.", positive=True)
    weight_decay: float = setting(1e-4, "AdamW weight decay.", minimum=0)
    decay_exclude: str | None = setting(None, "Trainable tensors without weight decay: none, or bias-norm (biases "
                                              "and LayerNorm/BatchNorm/GroupNorm parameters, as the official code) "
                                              "(default: the protocol's, samfit none, official bias-norm).",
                                        choices=DECAY_EXCLUDES)
    grad_clip: float = setting(1.0, "Clip the gradient norm at this value.", positive=True)
    flip: bool = setting(True, "Horizontal flip with p=0.5 (the only augmentation).")
    seed: int = setting(0, "Seed of initialisation, order and augmentation.", minimum=0)
    device: str = setting("auto", "auto takes CUDA when present.", choices=DEVICES)
    precision: str = setting("auto", "auto: fp16 autocast on CUDA, fp32 on CPU.", choices=PRECISIONS)
    attention: str = setting("sdpa", "sdpa (fused kernel) or reference (SAM's own code).",
                             choices=_attention_kinds)
    grad_checkpoint: bool = setting(False, "Recompute each encoder block in backward (less memory).")
    loss: str | None = setting(None, "Binary loss (default: the dataset's).", choices=_loss_names)
    head: str | None = setting(None, "Multi-class decoder head: samfit (queries from SAM's mask tokens 0-3 in turn "
                                     "plus 0.02 noise, a 2-layer class MLP) or official (every query from mask "
                                     "token 0, one Linear(256, C+1)) (default: the protocol's).", choices=HEADS)
    queries: int | None = setting(None, "Mask queries of the multi-class head (default: 2 per class).",
                                  positive=True)
    method_args: dict = setting({}, "The method's hyperparameters, key=value (see `samfit methods`).",
                                flag="method-arg")
    decoder: str = setting("full", "How much of the cut mask decoder trains: full (the paper's), frozen (only the "
                                   "method's encoder-side parts train), or lora:R (LoRA of rank R on the "
                                   "decoder's attention projections, plus its output tokens; the rest frozen).")
    limit_train: int | None = setting(None, "Use only the first N training images.", positive=True)
    train_fraction: float = setting(1.0, "Train on this share (0 < F <= 1) of the training split: a fixed "
                                         "subset, the same images for every method and seed, nested across "
                                         "fractions; the selection split is unchanged.", positive=True)
    limit_eval: int | None = setting(None, "Use only the first N images of each evaluation split.",
                                     positive=True)
    eval_resolution: str | None = setting(None, "Score at the ground truth's size (gt) or at the input size "
                                                "(model, as the official code) (default: the protocol's, samfit "
                                                "gt, official model).", choices=EVAL_RESOLUTIONS)
    num_workers: int = setting(0, "DataLoader worker processes.", minimum=0)
    datasets_file: str | None = setting(None, "Extra dataset registry (YAML).")
    data_root: str | None = setting(None, "Data root (default: $SAMFIT_DATA).")
    skip_bad: bool = setting(False, "Skip unreadable or invalid images, counting them.")
    detect_anomaly: bool = setting(False, "torch anomaly detection (slow).")
    cache_embeddings: str = setting("auto", "Encode each training image once when the encoder is frozen plain "
                                            "SAM (decoder-only), or compute the frozen blocks before the first "
                                            "trainable one once (late placement, e.g. blocks=last:3).",
                                    choices=CACHE_MODES)
    cache_max_mb: int = setting(4096, "RAM the embedding cache may take (auto: train uncached above it; on: "
                                      "error).", minimum=0)
    cache_dtype: str = setting("fp32", "Storage of the cached tensors: fp32 (exact) or bf16/fp16 (half the RAM; "
                                       "the rounding is measured and recorded in metrics.json).",
                               choices=CACHE_DTYPES)
    out: str = setting("results", "Parent folder of the run folder.")
    name: str | None = setting(None, "Run folder name (default: dataset_method_model_size_sSEED).")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(f.name, getattr(self, f.name)))
        self.protocol = self.protocol or "samfit"
        for key, value in PROTOCOL_SETTINGS.get(self.protocol, {}).items():  # an unknown protocol: validate's
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.validate()

    def validate(self) -> None:
        """Allowed values and bounds of every field; relations between fields."""
        for f in dataclasses.fields(self):
            check_value(f.name, getattr(self, f.name))
        from samfit.methods import get_method
        from samfit.methods.base import check_applies
        from samfit.model.backbones import check_image_size

        if self.image_size is not None:
            check_image_size(self.model, self.image_size)
        method = get_method(self.method, **self.method_args)  # the method's own Config checks its arguments
        check_applies(method, self.model)  # a method with no faithful form on the backbone: before any work
        self.method_args = {k: _plain(getattr(method.config, k)) for k in self.method_args}  # typed, not text
        from samfit.model.decoder_lora import normalise_decoder, nothing_would_train

        self.decoder = normalise_decoder(self.decoder)
        if self.decoder == "frozen" and not method.encoder_side:  # caught before any work (grid --dry-run too)
            raise nothing_would_train(self.decoder, self.method)
        if self.train_fraction > 1:
            raise SamfitError(f"--train-fraction {self.train_fraction}: must be in (0, 1].")
        if self.effective_batch % self.batch_size:
            raise SamfitError(f"--effective-batch {self.effective_batch} must be a multiple of --batch-size "
                              f"{self.batch_size}.")

    def resolved(self, spec) -> "RunConfig":
        """Fill the dataset's defaults where the user gave none (its loss in the protocol's form)."""
        from samfit.losses import protocol_loss
        from samfit.model.backbones import check_image_size, get_backbone

        size = self.image_size or get_backbone(self.model).fixed_size or spec.image_size
        check_image_size(self.model, size)  # the dataset's default size must fit the backbone too
        return dataclasses.replace(self, image_size=size, epochs=self.epochs or spec.epochs,
                                   lr=self.lr if self.lr is not None else spec.lr,
                                   loss=self.loss or protocol_loss(self.protocol, spec.loss))

    def run_name(self) -> str:
        method = method_label(self.method, self.method_args)
        suffix = "" if self.protocol == "samfit" else f"_{self.protocol}"  # beside samfit's run, not over it
        suffix = (f"_f{self.train_fraction:g}" if self.train_fraction < 1 else "") + suffix
        if self.decoder != "full":  # beside the full-decoder run, e.g. _dec-frozen, _dec-lora4
            suffix = f"_dec-{self.decoder.replace(':', '')}" + suffix
        return self.name or f"{Path(self.dataset).stem}_{method}_{self.model}_{self.image_size}_s{self.seed}{suffix}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def method_label(method: str, method_args: dict, decoder: str | None = None) -> str:
    """The method as run names and tables show it: with its placement when that is not every block
    (`lora@last:3`) and, given `decoder`, the decoder's share when that is not the full decoder
    (`lora@last:3 (decoder lora:4)`; run names carry it as a suffix instead, see RunConfig.run_name)."""
    blocks = (method_args or {}).get("blocks", "all")
    label = method if blocks == "all" else f"{method}@{blocks}"
    return label if decoder in (None, "full") else f"{label} (decoder {decoder})"


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_TYPES = typing.get_type_hints(RunConfig)


def field_type(key: str) -> type:
    """The field's value type without Optional: int, float, str, bool or dict."""
    kind = _TYPES[key]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args else kind


def allowed_values(key: str) -> tuple[str, ...] | None:
    choices = FIELDS[key].metadata["choices"]
    return choices() if callable(choices) else choices


def option_name(key: str) -> str:
    return "--" + (FIELDS[key].metadata["flag"] or key.replace("_", "-"))


def help_text(key: str) -> str:
    f = FIELDS[key]
    text = f.metadata["help"]
    choices = allowed_values(key)
    if choices:
        text += f" One of: {', '.join(choices)}."
    default = f.default if f.default is not dataclasses.MISSING else None
    if default not in (None, {}):
        text += f" Default: {default}."
    return text


def check_value(key: str, value, where: str = "") -> None:
    """The field's allowed values and bounds (relations between fields are RunConfig.validate's)."""
    if value is None:
        return
    meta, choices = FIELDS[key].metadata, allowed_values(key)
    if choices and value not in choices:
        raise SamfitError(f"{where}{option_name(key)} {value!r}: choose one of {', '.join(choices)}."
                          f"{closest(str(value), choices)}")
    if meta["positive"] and value <= 0 or meta["minimum"] is not None and value < meta["minimum"]:
        bound = "> 0" if meta["positive"] else f">= {meta['minimum']}"
        raise SamfitError(f"{where}{option_name(key)} {value}: must be {bound}.")


def coerce(key: str, value, where: str = ""):
    """A value from a file, a flag or `--set` as the field's type; a clear error when it cannot be one."""
    if key not in FIELDS:
        raise SamfitError(f"{where}unknown setting '{key}'.{closest(key, FIELDS)} Valid: {', '.join(FIELDS)}.")
    if value is None:
        return None
    kind = field_type(key)
    problem = f"{where}{key} must be {_article(kind)}, got {value!r}."
    if kind is dict:
        if not isinstance(value, dict):
            raise SamfitError(problem + " Give a mapping, e.g. {rank: 4}.")
        return dict(value)
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if not isinstance(value, bool):
            raise SamfitError(problem + " Use true or false.")
        return value
    if kind in (int, float):
        if isinstance(value, bool):
            raise SamfitError(problem)
        if isinstance(value, str):
            try:
                value = float(value) if kind is float else int(value)
            except ValueError:
                raise SamfitError(problem) from None
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, (int, float)) or kind is int and not isinstance(value, int):
            raise SamfitError(problem)
        if kind is float and not math.isfinite(value):
            raise SamfitError(problem + " It must be finite.")
        return kind(value)
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise SamfitError(problem)
    return str(value)


def _plain(value):
    """A method argument as YAML writes it (a tuple as a list)."""
    return list(value) if isinstance(value, tuple) else value


def _article(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", dict: "a mapping"}.get(kind, "a string")


def check_keys(where: str, mapping) -> dict:
    """A mapping of settings (a file, a grid's defaults) with every key a RunConfig field and every value
    coerced to its type and checked against its allowed values and bounds (errors name `where`)."""
    if not isinstance(mapping, dict):
        raise SamfitError(f"{where} must be a mapping of settings, got {type(mapping).__name__}.")
    values = {k: coerce(k, v, f"{where}: ") for k, v in mapping.items()}
    for key, value in values.items():
        check_value(key, value, f"{where}: ")
    return values


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SamfitError(f"Config file not found: {path}.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SamfitError(f"{path} is not valid YAML: {exc}") from None
    return check_keys(str(path), data)


def parse_set(pairs: list[str] | None, option: str = "--set") -> dict:
    """['epochs=1', 'device=cpu'] -> {'epochs': 1, 'device': 'cpu'}: values read as YAML scalars, then
    coerced to the field's type."""
    out = {}
    for key, text in parse_pairs(pairs, option, "epochs=1").items():
        coerce(key, None, f"{option} ")  # an unknown key is an error before its value is read
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        out[key] = coerce(key, text if field_type(key) is str and value is not None else value, f"{option} ")
    return out


def make_config(file: str | Path | None = None, **flags) -> RunConfig:
    """Defaults < --config file < flags given on the command line (None means 'not given')."""
    values = load_config_file(file) if file else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    return RunConfig(**values)
