"""One run, in named phases: prepare the data, build the model and its training step, resume, the epoch loop
(each epoch ends with model selection on the validation split), test the best checkpoint, record.

The recipe (docs/reference.md, Protocol): AdamW (weight decay 1e-4) with linear decay to 0 and no warm-up,
gradient accumulation to an effective batch, clipping at 1.0, autocast (fp16 + grad scaler on CUDA by default;
bf16 on CPU on request), horizontal flip p=0.5 drawn from a generator seeded by (seed, epoch, batch) so that
order and augmentation are identical across resumes. At the end of every epoch (and on SIGINT, at an
optimiser-step boundary) the full training state is saved; `resume=True` continues from it and ends with the
same scores as an uninterrupted run. Only the main process of a distributed run writes the run folder.
"""
from __future__ import annotations

import math
import platform
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from samfit.config import RunConfig
from samfit.data import (SegmentationFolder, ensure_available, fraction_pairs, resolve_dataset, selection_pairs,
                         split_pairs)
from samfit.engine import distributed, rundir
from samfit.engine.cache import prepare_cache
from samfit.engine.evaluate import evaluate, per_image_csv
from samfit.engine.profile import Timer, peak_memory_kind, peak_memory_mb, reset_peak_memory
from samfit.engine.sampling import (EpochSampler, epoch_order, flip_batch, flip_choices, rng_state,
                                    seed_everything, set_rng_state)
from samfit.engine.step import (NonFiniteLoss, TrainStep, autocast_for, make_optimizer, no_decay_parameters,
                                pick_device, resolve_precision, task_loss)
from samfit.errors import SamfitError
from samfit.methods import get_method
from samfit.model.attention import set_attention
from samfit.model import build_model
from samfit.model.checkpointing import set_grad_checkpoint
from samfit.model.decoder_lora import apply_decoder
from samfit.model import total_parameters as sam_total_parameters
from samfit.model.backbones import get_backbone, resolve_checkpoint
from samfit.params import count_parameters

console = Console(stderr=True)

__all__ = ["run", "build_model_for", "make_train_step", "Interrupted", "epoch_order", "flip_batch",
           "flip_choices", "autocast_for"]


class Interrupted(SamfitError):
    """SIGINT: the state was saved at an optimiser-step boundary; `--resume` continues."""


def build_model_for(cfg: RunConfig, num_classes: int, device: torch.device, checkpoint=None):
    """The Segmenter a run trains: SAM (from `checkpoint`, else random), the method applied, the decoder's
    share set (`--decoder`), the attention kind and activation checkpointing set, on the device."""
    model = build_model(cfg.model, num_classes=num_classes, image_size=cfg.image_size, checkpoint=checkpoint,
                        num_queries=cfg.queries, head=cfg.head)
    apply_decoder(get_method(cfg.method, **cfg.method_args).apply(model), cfg.decoder)
    set_grad_checkpoint(set_attention(model, cfg.attention), cfg.grad_checkpoint)
    return model.to(device)


def make_train_step(cfg: RunConfig, model, task: str, num_classes: int, total_steps: int, device: torch.device,
                    forward=None, average_gradients=lambda params: None) -> TrainStep:
    """The training step of a run with these settings (`samfit bench` times this same step). `forward` is the
    model the batches go through (the embedding cache's decoder-only view); the trainable parameters are
    `model`'s."""
    autocast, _, use_scaler = autocast_for(cfg.precision, device)
    params = [p for p in model.parameters() if p.requires_grad]
    no_decay = no_decay_parameters(model) if cfg.decay_exclude == "bias-norm" else None
    optimizer, scheduler, scaler = make_optimizer(params, cfg.lr, cfg.weight_decay, total_steps, device, use_scaler,
                                                  no_decay)
    return TrainStep(forward or model, params, optimizer, scheduler, scaler, autocast,
                     task_loss(task, num_classes, cfg.loss), cfg.effective_batch // cfg.batch_size, cfg.grad_clip,
                     average_gradients)


def run(config: RunConfig, resume: bool = False, quiet: bool = False) -> Path:
    """Train and evaluate one run; returns the run folder (holding metrics.json)."""
    spec = resolve_dataset(config.dataset, config.datasets_file)
    cfg = config.resolved(spec)  # RunConfig has validated every setting, the method's arguments included
    dist = distributed.setup(pick_device(cfg.device), cfg.batch_size)  # one process unless under torchrun
    run_dir = Path(cfg.out) / cfg.run_name()
    try:
        lock = rundir.RunLock(run_dir).acquire() if dist.is_main else None  # rank 0 holds it for all ranks
    except BaseException:
        dist.close()
        raise
    try:
        return Run(cfg, spec, dist, run_dir, quiet=quiet or not dist.is_main).execute(resume)
    except SamfitError as exc:
        if dist.is_main:
            rundir.set_status(run_dir, "interrupted" if isinstance(exc, Interrupted) else "failed", error=str(exc))
        raise
    except Exception as exc:
        if dist.is_main:
            rundir.set_status(run_dir, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if lock:
            lock.release()
        dist.close()


@dataclass
class State:
    """Where the loop is; saved in every checkpoint."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best: float | None = None
    best_epoch: int | None = None
    history: list = field(default_factory=list)


class Run:
    """The phases of one run. Attributes are set by the phase that makes them (data, model, resume)."""

    def __init__(self, cfg: RunConfig, spec, dist, run_dir: Path, quiet: bool):
        self.cfg, self.spec, self.dist, self.run_dir, self.quiet = cfg, spec, dist, run_dir, quiet
        self.device = dist.device
        self.writes = dist.is_main  # only the main process writes the run folder
        self.last_ckpt = run_dir / "checkpoints" / "last.pt"
        self.autocast = autocast_for(cfg.precision, self.device)[0]
        self.state = State()
        self.train_timer = Timer(self.device)

    def execute(self, resume: bool) -> Path:
        if resume and rundir.read_status(self.run_dir).get("status") == "done" and \
                (self.run_dir / "metrics.json").is_file():
            console.print(f"[green]{self.run_dir} is already complete.")
            return self.run_dir
        if self.writes:
            rundir.set_status(self.run_dir, "running")
            rundir.write_yaml(self.run_dir / "config.yaml", self.cfg.to_dict())
        seed_everything(self.cfg.seed)
        self.prepare_data()
        self.build()
        if resume and self.last_ckpt.is_file():
            self.resume()
        started = time.time()
        self.train()
        results, eval_throughput = self.test()
        self.record(results, eval_throughput, time.time() - started)
        return self.run_dir

    def make_set(self, pairs, limit):
        return SegmentationFolder(pairs, self.cfg.image_size, self.spec.task, self.spec.num_classes, limit=limit,
                                  skip_bad=self.cfg.skip_bad, model=self.cfg.model)

    def prepare_data(self) -> None:
        self.folder = self.dist.main_first(ensure_available, self.spec, self.cfg.data_root)
        if self.spec.missing_tests and self.writes:
            from samfit.data.registry import missing_tests_note

            console.print(f"[yellow]{missing_tests_note(self.spec)}")
        train_pairs, val_pairs, self.selection = selection_pairs(self.spec, self.folder)
        train_pairs = fraction_pairs(train_pairs, self.cfg.train_fraction)  # after the selection split is held out
        self.train_set = self.make_set(train_pairs, self.cfg.limit_train)
        self.val_set = self.make_set(val_pairs, self.cfg.limit_eval)

    def build(self) -> None:
        cfg, dist = self.cfg, self.dist
        checkpoint = resolve_checkpoint(cfg.model, cfg.checkpoint) if get_backbone(cfg.model).has_weights else None
        self.model = build_model_for(cfg, self.spec.num_classes, self.device, checkpoint)
        self.counts = count_parameters(self.model)
        dist.broadcast_parameters([p for p in self.model.parameters() if p.requires_grad])
        self.accum = cfg.effective_batch // cfg.batch_size
        self.batches_per_epoch = len(self.train_set) // cfg.batch_size
        self.steps_per_epoch = self.batches_per_epoch // self.accum
        if self.steps_per_epoch == 0:
            raise SamfitError(f"The training split has {len(self.train_set)} images, fewer than one optimiser step "
                              f"of --effective-batch {cfg.effective_batch}. Lower --effective-batch/--batch-size.")
        reset_peak_memory(self.device)
        self.cache, self.cache_report = prepare_cache(
            cfg, self.model, self.train_set, self.val_set, dist.local_batch(cfg.batch_size), self.device,
            self.autocast, log=console.print if not self.quiet else lambda *_: None)
        self.forward = self.cache.model if self.cache else self.model  # a cached run feeds embeddings
        self.step = make_train_step(cfg, self.model, self.spec.task, self.spec.num_classes,
                                    self.steps_per_epoch * cfg.epochs, self.device, forward=self.forward,
                                    average_gradients=dist.average_gradients)

    def resume(self) -> None:
        try:
            saved = torch.load(self.last_ckpt, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged file raises many types
            raise SamfitError(f"Cannot resume from {self.last_ckpt}: the checkpoint is unreadable "
                              f"({type(exc).__name__}). Delete it to start the run afresh.") from None
        if saved["config"] != self.cfg.to_dict():
            raise SamfitError(f"Cannot resume {self.run_dir}: its checkpoint was made with different settings. "
                              f"Start a fresh run (without --resume) or use another --out/--name.")
        self.model.load_state_dict(saved["trainable"], strict=False)
        for part in ("optimizer", "scheduler", "scaler"):
            getattr(self.step, part).load_state_dict(saved[part])
        set_rng_state(saved["rng"])
        self.state = State(**saved["state"])
        console.print(f"Resuming {self.run_dir} at epoch {self.state.epoch + 1}, batch {self.state.batch}.")

    def save_state(self) -> None:
        if self.writes:
            rundir.save_torch(self.last_ckpt, {
                "config": self.cfg.to_dict(), "trainable": trainable_state(self.model),
                "optimizer": self.step.optimizer.state_dict(), "scheduler": self.step.scheduler.state_dict(),
                "scaler": self.step.scaler.state_dict(), "rng": rng_state(), "state": vars(self.state)})

    def train(self) -> None:
        """The epoch loop; SIGINT stops at the next optimiser step with the state saved."""
        cfg, dist = self.cfg, self.dist
        interrupted: list[bool] = []
        previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
        self.sampler = EpochSampler()
        self.loader = DataLoader(self.train_set, batch_size=dist.local_batch(cfg.batch_size), sampler=self.sampler,
                                 num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
                                 persistent_workers=cfg.num_workers > 0)
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[info]}")]
        try:
            with Progress(*columns, console=console, disable=self.quiet, transient=True) as progress:
                epochs_task = progress.add_task("epochs", total=cfg.epochs, completed=self.state.epoch, info="")
                while self.state.epoch < cfg.epochs:
                    epoch_started = time.perf_counter()
                    loss = self.train_epoch(progress, interrupted)
                    value = self.select(progress)
                    self.end_epoch(loss, value, time.perf_counter() - epoch_started)
                    progress.update(epochs_task, advance=1, info=f"val {self.spec.headline} {value:.4f}")
        finally:
            signal.signal(signal.SIGINT, previous_handler)

    def epoch_batches(self):
        """This epoch's remaining micro-batches (from the saved batch on after a resume), flipped."""
        cfg, dist, epoch, first = self.cfg, self.dist, self.state.epoch, self.state.batch
        order = epoch_order(len(self.train_set), cfg.seed, epoch)[:self.batches_per_epoch * cfg.batch_size]
        self.sampler.indices = dist.shard(order[first * cfg.batch_size:], cfg.batch_size)
        if self.cache:
            flips = (lambda i, n: flip_choices(n, cfg.seed, epoch, first + i, dist.part)) if cfg.flip else None
            yield from self.cache.batches(self.sampler.indices, dist.local_batch(cfg.batch_size), flips)
            return
        for i, (images, targets, _) in enumerate(self.loader):
            if cfg.flip:
                images, targets = flip_batch(images, targets, cfg.seed, epoch, first + i, part=dist.part)
            yield images, targets

    def train_epoch(self, progress, interrupted: list) -> float:
        """One epoch of micro-batches; returns the last micro-batch's loss."""
        state, total = self.state, self.steps_per_epoch * self.accum
        self.model.train()
        task = progress.add_task(f"epoch {state.epoch + 1}", total=total, completed=state.batch, info="")
        loss = math.nan
        for images, targets, *_ in self.epoch_batches():
            if state.batch >= total:
                break
            with self.train_timer, torch.autograd.set_detect_anomaly(self.cfg.detect_anomaly):
                try:
                    loss, stepped = self.step(images.to(self.device, non_blocking=True), targets.to(self.device),
                                              state.batch)
                except NonFiniteLoss as exc:
                    raise self.nonfinite(exc) from None
            state.step += stepped
            loss = loss.item()
            self.train_timer.add_images(images.shape[0])
            state.batch += 1
            progress.update(task, advance=1, info=f"loss {loss:.4f}")
            if stepped and self.dist.any(interrupted):
                self.save_state()
                raise Interrupted(f"Interrupted. Progress saved in {self.last_ckpt}; continue with the same "
                                  f"command plus --resume.")
        progress.remove_task(task)
        return loss

    def nonfinite(self, exc: NonFiniteLoss) -> SamfitError:
        kept = (f"The last good checkpoint is kept in {self.last_ckpt}. " if self.last_ckpt.is_file() else
                "No checkpoint was saved yet (it fails in the first epoch). ")
        return SamfitError(f"{exc} at epoch {self.state.epoch + 1}, optimiser step {self.state.step}, lr "
                           f"{self.step.scheduler.get_last_lr()[0]:.3g}, precision "
                           f"{resolve_precision(self.cfg.precision, self.device)}. {kept}Try a lower --lr, "
                           f"--precision fp32, or --detect-anomaly to find the operation.")

    def select(self, progress) -> float:
        """Score the validation split; keep the parameters of the best epoch in checkpoints/best.pt."""
        spec, state = self.spec, self.state
        scores, _ = evaluate(self.forward, self.cache.val if self.cache else self.val_set, spec, self.cfg,
                             self.device, self.autocast, progress=progress,
                             label=f"validate ({self.selection['split']})", **self.dist.eval_args(len(self.val_set)))
        value = scores[spec.headline]
        if state.best is None or (value < state.best if spec.lower_is_better else value > state.best):
            state.best, state.best_epoch = value, state.epoch + 1
            if self.writes:
                rundir.save_torch(self.run_dir / "checkpoints" / "best.pt", trainable_state(self.model))
        return value

    def end_epoch(self, loss: float, value: float, seconds: float) -> None:
        state = self.state
        state.history.append({"epoch": state.epoch + 1, "step": state.step, "loss": self.dist.mean(loss),
                              "lr": self.step.scheduler.get_last_lr()[0], f"val_{self.spec.headline}": value,
                              "epoch_time_s": seconds})
        state.epoch, state.batch = state.epoch + 1, 0
        self.save_state()
        if self.writes:
            rundir.write_text(self.run_dir / "history.csv", _csv(state.history))

    def test(self) -> tuple[dict, float]:
        """Every evaluation split with the best checkpoint; (scores per split, evaluation images/s)."""
        dist = self.dist
        dist.barrier()  # rank 0 has written best.pt
        self.model.load_state_dict(torch.load(self.run_dir / "checkpoints" / "best.pt", weights_only=True),
                                   strict=False)
        results, timers = {}, []
        self.per_image = []  # one row per (test set, image), written to per_image.csv
        for split in self.spec.eval_splits:
            test_set = self.make_set(split_pairs(self.spec, self.folder, split), self.cfg.limit_eval)
            rows = []
            results[split], timer = evaluate(self.model, test_set, self.spec, self.cfg, self.device, self.autocast,
                                             label=f"test ({split})", per_image=rows, **dist.eval_args(len(test_set)))
            self.per_image += [{"test_set": split, **row} for row in rows]
            timers.append(timer)
        images = dist.sum(sum(t.images for t in timers))  # all ranks' images over the slowest rank's time
        seconds = dist.max(sum(sum(t.durations) for t in timers))
        return results, images / seconds if seconds else math.nan

    def record(self, results: dict, eval_img_per_s: float, wall_time_s: float) -> None:
        cfg, spec, dist, state = self.cfg, self.spec, self.dist, self.state
        sam_total = sam_total_parameters(cfg.model)
        checkpoint = resolve_checkpoint(cfg.model, cfg.checkpoint) if get_backbone(cfg.model).has_weights else None
        if checkpoint is not None and self.writes:  # the SAM weights the run used, for samfit.load_run
            from samfit.download import md5sum

            checkpoint = {"path": str(checkpoint.resolve()), "md5": md5sum(checkpoint)}
        metrics = {
            "run": cfg.run_name(), "protocol": cfg.protocol, "method": cfg.method, "dataset": spec.name,
            "model": cfg.model,
            "image_size": cfg.image_size, "seed": cfg.seed, "device": str(self.device),
            "precision": resolve_precision(cfg.precision, self.device),
            "eval_resolution": cfg.eval_resolution, "task": spec.task, "sam_checkpoint": checkpoint,
            "headline": {"metric": spec.headline, "lower_is_better": spec.lower_is_better,
                         "value": results[spec.eval_splits[0]][spec.headline], "split": spec.eval_splits[0]},
            "scores": results, "missing_test_sets": list(spec.missing_tests),
            "selection": {**self.selection, "best_epoch": state.best_epoch, "value": state.best},
            "params": {**self.counts, "sam_total": sam_total,
                       "percent_of_sam": 100 * self.counts["trainable"] / sam_total},
            "method_args": get_method(cfg.method, **cfg.method_args).describe(), "decoder": cfg.decoder,
            "throughput": {"train_img_per_s": dist.images_per_s(self.train_timer), "eval_img_per_s": eval_img_per_s,
                           "step_time_s": self.train_timer.median},
            "peak_memory_mb": dist.max(peak_memory_mb(self.device)), "peak_memory_kind": peak_memory_kind(self.device),
            "attention": cfg.attention, "grad_checkpoint": cfg.grad_checkpoint, "embedding_cache": self.cache_report,
            "processes": dist.world,
            "train_fraction": cfg.train_fraction, "train_images": len(self.train_set),
            "skipped_bad": len(self.train_set.skipped) + len(self.val_set.skipped),
            "wall_time_s": wall_time_s, "versions": versions(),
        }
        if self.writes:  # metrics.json last: it is what marks a run complete (a kill between the two is resumed)
            rundir.write_text(self.run_dir / "per_image.csv", per_image_csv(self.per_image))
            rundir.set_status(self.run_dir, "done")
            rundir.write_json(self.run_dir / "metrics.json", metrics)
        dist.barrier()  # every rank returns once rank 0 has written metrics.json


def trainable_state(model) -> dict:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().cpu().clone() for n, t in model.state_dict().items() if n in names}


def versions() -> dict:
    from importlib.metadata import version

    return {"samfit": version("samfit"), "torch": torch.__version__,
            "segment_anything": version("segment-anything"), "python": platform.python_version()}


def _csv(rows: list[dict]) -> str:
    import pandas as pd

    return pd.DataFrame(rows).to_csv(index=False)
