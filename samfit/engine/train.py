"""One run: build, train, select on validation, test, record (REFERENCE §1 protocol).

AdamW (weight decay 1e-4) with linear decay to 0 and no warm-up, gradient accumulation to an effective
batch, clipping at 1.0, autocast (fp16 + grad scaler on CUDA by default; bf16 on CPU on request),
horizontal flip p=0.5 drawn from a generator seeded by (seed, epoch, batch) so that order and
augmentation are identical across resumes. At the end of every epoch (and on SIGINT, at an optimiser-step
boundary) the full training state is saved; `resume=True` continues from it and ends with the same
scores as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import math
import platform
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

import samfit
from samfit.config import RunConfig
from samfit.data import SegmentationFolder, ensure_available, resolve_dataset, selection_pairs, split_pairs
from samfit.engine import distributed, rundir
from samfit.engine.cache import prepare_cache
from samfit.engine.evaluate import evaluate
from samfit.engine.profile import Timer, peak_memory_kind, peak_memory_mb, reset_peak_memory
from samfit.errors import SamfitError
from samfit.losses import get_loss, mask_classification_loss, semantic_targets
from samfit.methods.base import get_method
from samfit.model.attention import set_attention
from samfit.model.checkpointing import set_grad_checkpoint
from samfit.model.sam import sam_total_parameters

console = Console(stderr=True)


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """RNG states as tensors and plain numbers, so checkpoints load with torch.load(weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
             "python": [version, list(py_state), py_gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


class EpochSampler(torch.utils.data.Sampler):
    """Yields `indices`, which the loop sets every epoch: one DataLoader (and its persistent workers) serves
    every epoch in `epoch_order`."""

    def __init__(self):
        self.indices: list[int] = []

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def flip_choices(n: int, seed: int, epoch: int, batch: int, part: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """(n,) bool: which images of the batch flip_batch flips (the embedding cache replays the same choices)."""
    g = torch.Generator().manual_seed((seed * 100_003 + epoch) * 1_000_003 + batch)
    return torch.rand(n * part[1], generator=g)[part[0] * n:(part[0] + 1) * n] < 0.5


def flip_batch(images, targets, seed: int, epoch: int, batch: int, part: tuple[int, int] = (0, 1)):
    """Horizontal flip with p=0.5 per image, from a generator seeded by (seed, epoch, batch). `part` =
    (rank, world): the images are share `rank` of a micro-batch of `world` equal shares (distributed.py), and
    get the flips the whole micro-batch gets in one process."""
    flip = flip_choices(images.shape[0], seed, epoch, batch, part)
    images, targets = images.clone(), targets.clone()
    images[flip] = images[flip].flip(-1)
    targets[flip] = targets[flip].flip(-1)
    return images, targets


def task_loss(out: dict, targets: torch.Tensor, spec, loss_name: str) -> torch.Tensor:
    if spec.task == "binary":
        return get_loss(loss_name)(out["logits"].float(), targets)
    batch = [semantic_targets(t, spec.num_classes) for t in targets]
    return mask_classification_loss(out["class_logits"], out["mask_logits"], batch)


def trainable_state(model) -> dict:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().cpu().clone() for n, t in model.state_dict().items() if n in names}


def versions() -> dict:
    import segment_anything  # noqa: F401
    from importlib.metadata import version

    return {"samfit": samfit.__version__, "torch": torch.__version__,
            "segment_anything": version("segment-anything"), "python": platform.python_version()}


class Interrupted(SamfitError):
    """SIGINT: the state was saved at an optimiser-step boundary; `--resume` continues."""


def run(config: RunConfig, resume: bool = False, quiet: bool = False) -> Path:
    """Train and evaluate one run; returns the run folder (holding metrics.json)."""
    spec = resolve_dataset(config.dataset, config.datasets_file)
    cfg = config.resolved(spec)
    method = get_method(cfg.method, **cfg.method_args)  # validates --method-arg before any work
    dist = distributed.setup(pick_device(cfg.device), cfg.batch_size)  # one process unless under torchrun
    device = dist.device
    autocast, amp_dtype, use_scaler = autocast_for(cfg.precision, device)
    run_dir = Path(cfg.out) / cfg.run_name()
    try:
        lock = rundir.RunLock(run_dir).acquire()
    except BaseException:
        dist.close()
        raise
    try:
        return _run_locked(cfg, spec, method, device, autocast, use_scaler, run_dir, resume,
                           quiet or not dist.is_main)
    except SamfitError as exc:
        rundir.set_status(run_dir, "interrupted" if isinstance(exc, Interrupted) else "failed", error=str(exc))
        raise
    except Exception as exc:
        rundir.set_status(run_dir, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        lock.release()
        dist.close()


def _run_locked(cfg, spec, method, device, autocast, use_scaler, run_dir, resume, quiet) -> Path:
    last_ckpt = run_dir / "checkpoints" / "last.pt"
    if resume and rundir.read_status(run_dir).get("status") == "done" and (run_dir / "metrics.json").is_file():
        console.print(f"[green]{run_dir} is already complete.")
        return run_dir
    rundir.set_status(run_dir, "running")
    rundir.write_yaml(run_dir / "config.yaml", cfg.to_dict())
    seed_everything(cfg.seed)
    dist = distributed.current()

    folder = dist.main_first(ensure_available, spec, cfg.data_root)
    make = lambda pairs, limit: SegmentationFolder(pairs, cfg.image_size, spec.task,  # noqa: E731
                                                   spec.num_classes, limit=limit, skip_bad=cfg.skip_bad)
    train_pairs, val_pairs, selection = selection_pairs(spec, folder)
    train_set = make(train_pairs, cfg.limit_train)
    val_set = make(val_pairs, cfg.limit_eval)

    checkpoint = None
    if cfg.model != "tiny":
        from samfit.model.sam import resolve_checkpoint

        checkpoint = resolve_checkpoint(cfg.model, cfg.checkpoint)
    model = samfit.build_model(cfg.model, num_classes=spec.num_classes, image_size=cfg.image_size,
                               checkpoint=checkpoint)
    method.apply(model)
    set_grad_checkpoint(set_attention(model, cfg.attention), cfg.grad_checkpoint)
    model.to(device)
    counts = samfit.count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    dist.broadcast_parameters(params)
    accum = cfg.effective_batch // cfg.batch_size
    batches_per_epoch = len(train_set) // cfg.batch_size
    steps_per_epoch = batches_per_epoch // accum
    if steps_per_epoch == 0:
        raise SamfitError(f"The training split has {len(train_set)} images, fewer than one optimiser step of "
                          f"--effective-batch {cfg.effective_batch}. Lower --effective-batch/--batch-size.")
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / total_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    state = {"epoch": 0, "batch": 0, "step": 0, "best": None, "best_epoch": None, "history": []}
    if resume and last_ckpt.is_file():
        try:
            saved = torch.load(last_ckpt, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged file raises many types
            raise SamfitError(f"Cannot resume from {last_ckpt}: the checkpoint is unreadable ({type(exc).__name__}). "
                              f"Delete it to start the run afresh.") from None
        if saved["config"] != cfg.to_dict():
            raise SamfitError(f"Cannot resume {run_dir}: its checkpoint was made with different settings. "
                              f"Start a fresh run (without --resume) or use another --out/--name.")
        model.load_state_dict(saved["trainable"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"])
        state = saved["state"]
        console.print(f"Resuming {run_dir} at epoch {state['epoch'] + 1}, batch {state['batch']}.")

    def save_state():
        rundir.save_torch(last_ckpt, {"config": cfg.to_dict(), "trainable": trainable_state(model),
                                      "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                      "scaler": scaler.state_dict(), "rng": rng_state(), "state": state})

    interrupted = []
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    train_timer = Timer(device)
    reset_peak_memory(device)
    cache, cache_report = prepare_cache(cfg, model, train_set, val_set, dist.local_batch(cfg.batch_size), device,
                                        autocast, log=console.print if not quiet else lambda *_: None)
    forward = cache.model if cache else model  # a cached run feeds embeddings to the decoder
    sampler = EpochSampler()
    loader = DataLoader(train_set, batch_size=dist.local_batch(cfg.batch_size), sampler=sampler,
                        num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=cfg.num_workers > 0)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}")]
    started = time.time()
    try:
        with Progress(*columns, console=console, disable=quiet, transient=True) as progress:
            epochs_task = progress.add_task("epochs", total=cfg.epochs, completed=state["epoch"], info="")
            while state["epoch"] < cfg.epochs:
                epoch, epoch_started = state["epoch"], time.perf_counter()
                model.train()
                order = epoch_order(len(train_set), cfg.seed, epoch)[:batches_per_epoch * cfg.batch_size]
                start = state["batch"] * cfg.batch_size
                sampler.indices = dist.shard(order[start:], cfg.batch_size)
                first = state["batch"]
                flips = (lambda i, n: flip_choices(n, cfg.seed, epoch, first + i, dist.part)) if cfg.flip else None
                batches = cache.batches(sampler.indices, dist.local_batch(cfg.batch_size), flips) if cache else loader
                batch_task = progress.add_task(f"epoch {epoch + 1}", total=steps_per_epoch * accum,
                                               completed=state["batch"], info="")
                for images, targets, _ in batches:
                    b = state["batch"]
                    if b >= steps_per_epoch * accum:
                        break
                    if cfg.flip and not cache:
                        images, targets = flip_batch(images, targets, cfg.seed, epoch, b, part=dist.part)
                    with train_timer, torch.autograd.set_detect_anomaly(cfg.detect_anomaly):
                        images, targets = images.to(device, non_blocking=True), targets.to(device)
                        with autocast():
                            out = forward(images)
                            loss = task_loss(out, targets, spec, cfg.loss) + out["aux_loss"].float()
                        if not torch.isfinite(loss):
                            raise SamfitError(
                                f"Loss became {loss.item()} at epoch {epoch + 1}, optimiser step {state['step']}, "
                                f"lr {scheduler.get_last_lr()[0]:.3g}, precision "
                                f"{resolve_precision(cfg.precision, device)}. "
                                + (f"The last good checkpoint is kept in {last_ckpt}. " if last_ckpt.is_file() else
                                   "No checkpoint was saved yet (it fails in the first epoch). ")
                                + "Try a lower --lr, --precision fp32, or "
                                f"--detect-anomaly to find the operation.")
                        scaler.scale(loss / accum).backward()
                        if (b + 1) % accum == 0:
                            dist.average_gradients(params)
                            scaler.unscale_(optimizer)
                            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                            scaler.step(optimizer)
                            scaler.update()
                            optimizer.zero_grad(set_to_none=True)
                            scheduler.step()
                            state["step"] += 1
                    train_timer.add_images(images.shape[0])
                    state["batch"] = b + 1
                    progress.update(batch_task, advance=1, info=f"loss {loss.item():.4f}")
                    if (b + 1) % accum == 0 and dist.any(interrupted):
                        save_state()
                        raise Interrupted(
                            f"Interrupted. Progress saved in {last_ckpt}; continue with the same command "
                            f"plus --resume.")
                progress.remove_task(batch_task)
                scores, _ = evaluate(forward, cache.val if cache else val_set, spec, cfg, device, autocast,
                                     progress=progress, label=f"validate ({selection['split']})",
                                     **dist.eval_args(len(val_set)))
                value = scores[spec.headline]
                improved = state["best"] is None or (value < state["best"] if spec.lower_is_better
                                                     else value > state["best"])
                if improved:
                    state["best"], state["best_epoch"] = value, epoch + 1
                    rundir.save_torch(run_dir / "checkpoints" / "best.pt", trainable_state(model))
                state["history"].append({"epoch": epoch + 1, "step": state["step"], "loss": dist.mean(loss.item()),
                                         "lr": scheduler.get_last_lr()[0], f"val_{spec.headline}": value,
                                         "epoch_time_s": time.perf_counter() - epoch_started})
                state["epoch"], state["batch"] = epoch + 1, 0
                save_state()
                rundir.write_text(run_dir / "history.csv", _csv(state["history"]))
                progress.update(epochs_task, advance=1, info=f"val {spec.headline} {value:.4f}")
    finally:
        signal.signal(signal.SIGINT, previous_handler)

    dist.barrier()  # rank 0 has written best.pt
    model.load_state_dict(torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True), strict=False)
    results, eval_timers = {}, []
    for split in spec.eval_splits:
        test_set = make(split_pairs(spec, folder, split), cfg.limit_eval)
        results[split], timer = evaluate(model, test_set, spec, cfg, device, autocast, label=f"test ({split})",
                                         **dist.eval_args(len(test_set)))
        eval_timers.append(timer)
    eval_images = dist.sum(sum(t.images for t in eval_timers))  # all ranks' images over the slowest rank's time
    eval_time = dist.max(sum(sum(t.durations) for t in eval_timers))
    sam_total = sam_total_parameters(cfg.model)
    metrics = {
        "run": cfg.run_name(), "method": cfg.method, "dataset": spec.name, "model": cfg.model,
        "image_size": cfg.image_size, "seed": cfg.seed, "device": str(device),
        "precision": resolve_precision(cfg.precision, device),
        "eval_resolution": cfg.eval_resolution, "task": spec.task,
        "headline": {"metric": spec.headline, "lower_is_better": spec.lower_is_better,
                     "value": results[spec.eval_splits[0]][spec.headline], "split": spec.eval_splits[0]},
        "scores": results,
        "selection": {**selection, "best_epoch": state["best_epoch"], "value": state["best"]},
        "params": {**counts, "sam_total": sam_total, "percent_of_sam": 100 * counts["trainable"] / sam_total},
        "method_args": method.describe(),
        "throughput": {"train_img_per_s": dist.images_per_s(train_timer), "eval_img_per_s":
                       eval_images / eval_time if eval_time else math.nan, "step_time_s": train_timer.median},
        "peak_memory_mb": dist.max(peak_memory_mb(device)), "peak_memory_kind": peak_memory_kind(device),
        "attention": cfg.attention, "grad_checkpoint": cfg.grad_checkpoint, "embedding_cache": cache_report,
        "processes": dist.world,
        "train_images": len(train_set), "skipped_bad": len(train_set.skipped) + len(val_set.skipped),
        "wall_time_s": time.time() - started, "versions": versions(),
    }
    rundir.write_json(run_dir / "metrics.json", metrics)
    rundir.set_status(run_dir, "done")
    dist.barrier()  # every rank returns once rank 0 has written metrics.json
    return run_dir


def _csv(rows: list[dict]) -> str:
    import pandas as pd

    return pd.DataFrame(rows).to_csv(index=False)
