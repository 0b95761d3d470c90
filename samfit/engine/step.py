"""The training step `samfit run` takes and `samfit bench` times: one function, so the benchmark measures the
very computation a run performs.

A micro-batch: forward under autocast, task loss (the binary loss, or the mask-classification loss) plus the
method's auxiliary loss (Conv-LoRA's load balancing), a finiteness check, backward of loss / accum through the
grad scaler. After every `accum`-th micro-batch, the optimiser step: average gradients over the processes,
unscale, clip the gradient norm, AdamW step, scaler update, zero the gradients, advance the learning rate.
AdamW with linear decay to 0 and no warm-up, as the official Conv-LoRA recipe (docs/reference.md, Protocol);
weight decay on every trainable tensor, or (`decay_exclude: bias-norm`, the official protocol's) not on biases
and normalisation parameters (`no_decay_parameters`).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from samfit.errors import SamfitError
from samfit.losses import (MASK_CLASSIFICATION_OFFICIAL, get_loss, mask_classification_loss,
                           mask_classification_loss_official, semantic_targets)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SamfitError("--device cuda was asked for, but CUDA is not available here (no GPU or a CPU-only "
                          "torch). Use --device cpu, or --device auto to take CUDA when present.")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> fp16 autocast on CUDA (the official code's mixed precision), fp32 on CPU."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


def autocast_for(precision: str, device: torch.device):
    """(context factory, dtype or None, needs grad scaler)."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext, None, False
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu" and dtype == torch.float16:
        raise SamfitError("--precision fp16 needs CUDA; on CPU use bf16 or fp32.")
    return (lambda: torch.autocast(device.type, dtype=dtype)), dtype, dtype == torch.float16


def task_loss(task: str, num_classes: int, loss_name: str) -> Callable[[dict, torch.Tensor], torch.Tensor]:
    """loss(model output, targets): the named binary loss on the logits, or the mask-classification loss
    (Hungarian matching of the queries to the ground-truth class masks; `mask-classification-official`: the
    official code's form) for multi-class tasks."""
    if task == "binary":
        binary = get_loss(loss_name)
        return lambda out, targets: binary(out["logits"].float(), targets)

    def multiclass(out, targets):
        batch = [semantic_targets(t, num_classes) for t in targets]
        return set_loss(out["class_logits"], out["mask_logits"], batch)

    set_loss = mask_classification_loss_official if loss_name == MASK_CLASSIFICATION_OFFICIAL else \
        mask_classification_loss
    return multiclass


class NonFiniteLoss(SamfitError):
    """The loss became inf or NaN; the run adds where and what to try."""


# The module types whose parameters the official code keeps out of weight decay (besides every `bias`). SAM's
# channel-first LayerNorm2d (neck, decoder upscaling) is a plain Module there as here, so its weight is decayed.
NORM_TYPES = (torch.nn.LayerNorm, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
              torch.nn.GroupNorm)


def no_decay_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable parameters the official code trains without weight decay: those of LayerNorm, BatchNorm and
    GroupNorm modules, and every parameter with "bias" in its name."""
    norm = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    return [p for name, p in model.named_parameters()
            if p.requires_grad and (id(p) in norm or "bias" in name)]


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float, total_steps: int,
                   device: torch.device, use_scaler: bool, no_decay: list[torch.nn.Parameter] | None = None):
    """(AdamW, linear decay of the lr to 0 over `total_steps`, grad scaler enabled for fp16). With `no_decay` (a
    subset of `params`), two groups as the official code: the rest with `weight_decay`, those with none."""
    if no_decay is not None:
        skip = {id(p) for p in no_decay}
        params = [{"params": [p for p in params if id(p) not in skip], "weight_decay": weight_decay},
                  {"params": [p for p in params if id(p) in skip], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / total_steps))
    return optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=use_scaler)


class TrainStep:
    """`step(images, targets, index)` trains on one micro-batch (the `index`-th of the epoch) and takes the
    optimiser step after every `accum`-th; returns (loss, whether the optimiser stepped)."""

    def __init__(self, forward, params, optimizer, scheduler, scaler, autocast, loss, accum: int,
                 grad_clip: float, average_gradients: Callable[[list], None] = lambda params: None):
        self.forward, self.params, self.loss, self.autocast = forward, params, loss, autocast
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.accum, self.grad_clip, self.average_gradients = accum, grad_clip, average_gradients

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, index: int) -> tuple[torch.Tensor, bool]:
        with self.autocast():
            out = self.forward(images)
            loss = self.loss(out, targets) + out["aux_loss"].float()
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"Loss became {loss.item()}")
        self.scaler.scale(loss / self.accum).backward()
        if (index + 1) % self.accum:
            return loss.detach(), False
        self.average_gradients(self.params)
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss.detach(), True
