"""`samfit bench`: training step time, evaluation throughput and peak memory of PEFT methods, side by side.

Every (method, attention, precision, grad-checkpoint) configuration is built once in this process; after
`warmup` untimed steps each, the N timed training steps and then the N evaluation batches run round-robin
(configuration 1, 2, …, k, then 2, …, k, 1, …), so a slow spell of a shared machine hits every configuration
alike and their ratios stay meaningful. A timed training step is one optimiser step of `samfit run`'s own
`TrainStep` (engine/step.py), built by the same `train.build_model_for` / `train.make_train_step`: effective
batch / batch micro-batches, each forward under autocast, task loss (structure loss, or the mask-classification
loss with num_classes > 1) + auxiliary loss, backward through the grad scaler; then clipping and the AdamW step.
Timing and memory use the engine's own `profile.Timer` and `profile.peak_memory_mb`, as `samfit run` does.

Peak memory is measured for each configuration in a fresh subprocess that builds the model, resets the peak
(`profile.reset_peak_memory`), and trains `warmup + 2` steps: on CUDA the max allocated memory (model
included); on CPU the peak resident set size above the RSS after building the model. In one process, the
peak of the method measured first would hide the peaks of the others.

`data_throughput` times the input pipeline instead of the model: read + decode + resize + normalise in
DataLoader workers (pinned memory on CUDA, persistent workers), plus the engine's flip, in images/s.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from samfit.config import RunConfig
from samfit.engine.profile import Timer, peak_memory_kind, peak_memory_mb, reset_peak_memory, synchronize
from samfit.errors import SamfitError
from samfit.params import count_parameters

MEMORY_STEPS = 2


@dataclass(frozen=True)
class Setting:
    """One configuration of the benchmark. `method` may carry a placement, `lora@last:3`; `cache`: train from the
    stored tensors `samfit run` would cache for this model (the prefix of late placement, or decoder-only's
    embeddings; engine/cache.py) where it allows one."""

    method: str
    attention: str = "sdpa"
    precision: str = "fp32"
    grad_checkpoint: bool = False
    cache: bool = False

    @property
    def name(self) -> str:
        return self.method.partition("@")[0]

    @property
    def method_args(self) -> dict:
        blocks = self.method.partition("@")[2]
        return {"blocks": blocks} if blocks else {}

    @property
    def label(self) -> str:
        extras = [self.attention, self.precision] + (["grad-ckpt"] if self.grad_checkpoint else []) + (
            ["cache"] if self.cache else [])
        return f"{self.method} ({', '.join(extras)})"


@dataclass(frozen=True)
class Shape:
    """What every configuration is measured on: `batch` images per forward pass, `effective_batch` per
    optimiser step (None: no accumulation), `num_classes` 1 (binary) or more (mask classification)."""

    model: str
    image_size: int
    batch: int
    device: str
    effective_batch: int | None = None
    num_classes: int = 1

    @property
    def accum(self) -> int:
        return (self.effective_batch or self.batch) // self.batch


def run_config(setting: Setting, shape: Shape) -> RunConfig:
    """The run settings whose training step this configuration times (random weights, one epoch)."""
    return RunConfig(method=setting.name, method_args=setting.method_args, model=shape.model, image_size=shape.image_size, batch_size=shape.batch,
                     effective_batch=shape.effective_batch or shape.batch, precision=setting.precision,
                     attention=setting.attention, grad_checkpoint=setting.grad_checkpoint, device=shape.device,
                     lr=1e-5, epochs=1, loss="structure")


def synthetic_batch(shape: Shape, seed: int = 0):
    """Random images and targets: binary masks (B, 1, S, S), or class maps (B, S, S) with num_classes > 1."""
    g = torch.Generator().manual_seed(seed)
    s = shape.image_size
    images = torch.randn(shape.batch, 3, s, s, generator=g)
    if shape.num_classes == 1:
        targets = (torch.rand(shape.batch, 1, s, s, generator=g) > 0.5).float()
    else:
        targets = torch.randint(0, shape.num_classes, (shape.batch, s, s), generator=g)
    device = torch.device(shape.device)
    return images.to(device), targets.to(device)


class Bench:
    """A built configuration that can take timed training steps and evaluation batches."""

    def __init__(self, setting: Setting, shape: Shape, seed: int = 0):
        from samfit.engine.train import build_model_for, make_train_step

        self.setting, self.shape = setting, shape
        cfg = run_config(setting, shape)
        device = torch.device(shape.device)
        torch.manual_seed(seed)
        self.model = build_model_for(cfg, shape.num_classes, device)
        task = "binary" if shape.num_classes == 1 else "multiclass"
        self.images, self.targets = synthetic_batch(shape, seed)
        self.forward, self.cache = self.model, None
        if setting.cache:
            self.cache = self.stored_batch(cfg, device)
        self.step = make_train_step(cfg, self.model, task, shape.num_classes, total_steps=10**9, device=device,
                                    forward=self.forward)
        self.train_timer, self.eval_timer = Timer(device), Timer(device)

    def stored_batch(self, cfg, device) -> dict:
        """Replace the batch by what the run's cache would store for it (kept out of the timed steps, as a cached
        run builds its cache before training); returns what the record says about the cache."""
        from samfit.engine.cache import build_cache, cache_plan

        plan, reason = cache_plan(self.model, cfg.image_size)
        if plan is None:
            return {"kind": None, "reason": reason}
        items = [(image.cpu(), target.cpu(), i) for i, (image, target) in enumerate(zip(self.images, self.targets))]
        cache = build_cache(self.model, items, items, self.shape.batch, self.shape.batch, False, device,
                            self.step_autocast(cfg, device), plan=plan)
        stored, targets, _ = next(cache.batches(list(range(len(items))), self.shape.batch, None))
        self.images, self.targets, self.forward = stored.to(device), targets.to(device), cache.model
        return {"kind": plan.kind, "blocks_cached": plan.blocks, "mb_per_image": round(plan.item_mb, 3)}

    @staticmethod
    def step_autocast(cfg, device):
        from samfit.engine.step import autocast_for

        return autocast_for(cfg.precision, device)[0]

    def train_step(self) -> float:
        """One optimiser step: `accum` micro-batches; returns the last micro-batch's loss."""
        self.model.train()
        for i in range(self.shape.accum):
            loss, _ = self.step(self.images, self.targets, i)
        return loss.item()

    @torch.no_grad()
    def eval_batch(self) -> None:
        self.forward.eval()
        with self.step.autocast():
            self.forward(self.images)["logits"].float().sigmoid()

    def run(self, kind: str) -> None:
        if kind == "train":
            self.train_step()
        else:
            self.eval_batch()

    def timed(self, kind: str) -> None:
        timer = self.train_timer if kind == "train" else self.eval_timer
        with timer:
            self.run(kind)
        timer.add_images(self.shape.batch * (self.shape.accum if kind == "train" else 1))

    def record(self, peak_mb: float | None) -> dict:
        s, shape = self.setting, self.shape
        return {"method": s.method, "cache": self.cache, "step_time_s": self.train_timer.median,
                "train_img_per_s": self.train_timer.images_per_s, "eval_img_per_s": self.eval_timer.images_per_s,
                "eval_batch_time_s": self.eval_timer.median, "peak_memory_mb": peak_mb,
                "trainable_params": count_parameters(self.model)["trainable"], "attention": s.attention,
                "precision": s.precision, "grad_checkpoint": s.grad_checkpoint, "device": shape.device,
                "model": shape.model, "image_size": shape.image_size, "batch": shape.batch,
                "effective_batch": shape.effective_batch or shape.batch, "num_classes": shape.num_classes,
                "step_times_s": [round(t, 4) for t in self.train_timer.durations]}


def round_robin(benches: list[Bench], kind: str, rounds: int, timed: bool = True) -> None:
    """`rounds` rounds over all configurations, each round starting one configuration later."""
    k = len(benches)
    for r in range(rounds):
        for bench in benches[r % k:] + benches[:r % k]:
            if timed:
                bench.timed(kind)
            else:
                bench.run(kind)


def measure_peak_memory(setting: Setting, shape: Shape, steps: int) -> float:
    """Peak memory of `steps` training steps after building (in this process: call it in a fresh one)."""
    bench = Bench(setting, shape)
    synchronize(torch.device(shape.device))
    reset_peak_memory(torch.device(shape.device))
    for _ in range(steps):
        bench.train_step()
    synchronize(torch.device(shape.device))
    return peak_memory_mb(torch.device(shape.device))


def peak_memory_in_subprocess(setting: Setting, shape: Shape, steps: int) -> float:
    payload = json.dumps({"setting": asdict(setting), "shape": asdict(shape), "steps": steps,
                          "threads": torch.get_num_threads()})
    proc = subprocess.run([sys.executable, "-m", "samfit.engine.bench", payload], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SamfitError(f"Memory measurement of {setting.label} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_memory_mb"]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def load_average() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def run_bench(methods: list[str], shape: Shape, steps: int, warmup: int = 2, attentions=("sdpa",),
              precisions=("fp32",), checkpoints=(False,), memory: bool = True, baseline: str = "lora",
              log=print, caches=(False,)) -> tuple[list[dict], dict]:
    """Benchmark every combination; returns (records with ratios to `baseline`, meta)."""
    if steps < 1 or warmup < 0:
        raise SamfitError("--steps must be >= 1 and --warmup >= 0.")
    settings = [Setting(*combo) for combo in itertools.product(methods, attentions, precisions, checkpoints, caches)]
    for setting in settings:
        run_config(setting, shape)  # every setting is valid before anything is measured
    meta = {"machine": machine(), "load_before": load_average(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "steps": steps, "warmup": warmup, "memory_steps": warmup + MEMORY_STEPS, "baseline": baseline,
            "peak_memory_kind": peak_memory_kind(torch.device(shape.device)), **asdict(shape)}
    peaks = {}
    if memory:
        for setting in settings:
            log(f"peak memory: {setting.label} …")
            peaks[setting] = peak_memory_in_subprocess(setting, shape, warmup + MEMORY_STEPS)
    log(f"building {len(settings)} configurations …")
    benches = [Bench(s, shape) for s in settings]
    round_robin(benches, "train", warmup, timed=False)
    round_robin(benches, "eval", min(warmup, 1), timed=False)
    log(f"timing {steps} training steps and {steps} evaluation batches per configuration, round-robin …")
    round_robin(benches, "train", steps)
    round_robin(benches, "eval", steps)
    meta["load_after"] = load_average()
    return add_ratios([b.record(peaks.get(b.setting)) for b in benches], baseline), meta


RATIO_KEYS = ("step_time_s", "train_img_per_s", "eval_img_per_s", "peak_memory_mb", "trainable_params")


def add_ratios(records: list[dict], baseline: str = "lora") -> list[dict]:
    """Every figure as a ratio to the baseline method's first record (its first listed attention, precision
    and grad-checkpoint setting): keys `<figure>_vs_baseline`; None where the baseline was not measured."""
    base = next((r for r in records if r["method"] == baseline), None)
    for r in records:
        for key in RATIO_KEYS:
            ok = base is not None and r.get(key) is not None and base.get(key)
            r[f"{key}_vs_baseline"] = r[key] / base[key] if ok else None
    return records


def data_throughput(dataset: str, image_size: int, batch: int, num_workers: int, batches: int, device: str,
                    data_root: str | None = None, datasets_file: str | None = None) -> dict:
    """Images/s of the engine's input pipeline on a dataset's training split."""
    from torch.utils.data import DataLoader

    from samfit.data import SegmentationFolder, ensure_available, resolve_dataset, split_pairs
    from samfit.engine.sampling import EpochSampler, epoch_order, flip_batch

    spec = resolve_dataset(dataset, datasets_file)
    folder = ensure_available(spec, data_root)
    train_set = SegmentationFolder(split_pairs(spec, folder, spec.train), image_size, spec.task, spec.num_classes)
    sampler = EpochSampler()
    loader = DataLoader(train_set, batch_size=batch, sampler=sampler, num_workers=num_workers,
                        pin_memory=device == "cuda", persistent_workers=num_workers > 0)
    if len(train_set) < batch:
        raise SamfitError(f"{spec.name}'s training split has fewer than {batch} images.")

    def stream():
        for epoch in itertools.count():
            sampler.indices = epoch_order(len(train_set), 0, epoch)[:len(train_set) // batch * batch]
            for b, (images, targets, _) in enumerate(loader):
                yield epoch, b, images, targets

    batches_in = stream()
    next(batches_in)  # worker start-up is not timed
    timer = Timer(torch.device("cpu"))
    for _ in range(batches):
        with timer:
            epoch, b, images, targets = next(batches_in)
            flip_batch(images, targets, 0, epoch, b)
        timer.add_images(images.shape[0])
    batches_in.close()
    return {"dataset": spec.name, "split": spec.train, "image_size": image_size, "batch": batch,
            "num_workers": num_workers, "images": timer.images, "img_per_s": timer.images_per_s,
            "pin_memory": device == "cuda", "persistent_workers": num_workers > 0}


def _probe(payload: str) -> None:
    """Subprocess entry: print {"peak_memory_mb": …} for one configuration."""
    spec = json.loads(payload)
    torch.set_num_threads(spec["threads"])
    peak = measure_peak_memory(Setting(**spec["setting"]), Shape(**spec["shape"]), spec["steps"])
    print(json.dumps({"peak_memory_mb": peak}))


if __name__ == "__main__":
    _probe(sys.argv[1])
