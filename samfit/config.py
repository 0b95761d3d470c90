"""RunConfig: everything one run needs. Precedence: defaults < datasets.yaml < --config file < CLI flags."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from samfit.errors import SamfitError


@dataclass
class RunConfig:
    method: str = "lora"
    dataset: str = "shapes"
    model: str = "tiny"
    checkpoint: str | None = None
    image_size: int | None = None  # None: the dataset's default (the tiny model: 128)
    epochs: int | None = None  # None: the dataset's default
    lr: float | None = None  # None: the dataset's default
    batch_size: int = 4
    effective_batch: int = 4  # gradient accumulation up to this many images per optimiser step
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    flip: bool = True
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: fp16 autocast on CUDA, fp32 on CPU; or fp32 | bf16 | fp16
    attention: str = "sdpa"
    grad_checkpoint: bool = False
    loss: str | None = None  # None: the dataset's default
    method_args: dict = field(default_factory=dict)
    limit_train: int | None = None
    limit_eval: int | None = None
    eval_resolution: str = "gt"  # gt: the ground truth's own size; model: the input size (official code)
    num_workers: int = 0
    datasets_file: str | None = None
    data_root: str | None = None
    skip_bad: bool = False
    detect_anomaly: bool = False
    cache_embeddings: str = "auto"  # frozen plain encoder (decoder-only): auto | on | off
    cache_max_mb: int = 4096  # RAM the embedding cache may take (auto: train uncached above it; on: error)
    out: str = "results"
    name: str | None = None

    def resolved(self, spec) -> "RunConfig":
        """Fill the dataset's defaults where the user gave none; validate choices."""
        from samfit.model.sam import check_image_size, get_variant

        variant = get_variant(self.model)
        size = self.image_size or (variant.default_size if self.model == "tiny" else spec.image_size)
        check_image_size(size)
        cfg = dataclasses.replace(self, image_size=size, epochs=self.epochs or spec.epochs,
                                  lr=self.lr if self.lr is not None else spec.lr, loss=self.loss or spec.loss)
        for key, allowed in {"device": ("auto", "cpu", "cuda"), "precision": ("auto", "fp32", "bf16", "fp16"),
                             "eval_resolution": ("gt", "model"), "attention": ("sdpa", "reference"),
                             "cache_embeddings": ("auto", "on", "off")}.items():
            if getattr(cfg, key) not in allowed:
                raise SamfitError(f"--{key.replace('_', '-')} {getattr(cfg, key)!r}: choose one of {', '.join(allowed)}.")
        if cfg.batch_size < 1 or cfg.effective_batch < cfg.batch_size or cfg.effective_batch % cfg.batch_size:
            raise SamfitError(f"--effective-batch {cfg.effective_batch} must be a multiple of --batch-size "
                              f"{cfg.batch_size}.")
        return cfg

    def run_name(self) -> str:
        return self.name or f"{Path(self.dataset).stem}_{self.method}_{self.model}_{self.image_size}_s{self.seed}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SamfitError(f"Config file not found: {path}.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SamfitError(f"{path} is not valid YAML: {exc}") from None
    valid = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise SamfitError(f"{path}: unknown settings {unknown}. Valid: {sorted(valid)}.")
    return data


def make_config(file: str | Path | None = None, **flags) -> RunConfig:
    """Defaults < --config file < flags given on the command line (None means 'not given')."""
    values = load_config_file(file) if file else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    return RunConfig(**values)
