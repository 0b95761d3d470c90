"""`samfit bench`: training step time, evaluation throughput and peak memory of PEFT methods, side by side.

Every (method, attention, precision, grad-checkpoint) configuration is built once in this process; after
`warmup` untimed steps each, the N timed training steps and then the N evaluation batches run round-robin
(configuration 1, 2, …, k, then 2, …, k, 1, …), so a slow spell of a shared machine hits every configuration
alike and their ratios stay meaningful. A training step is the engine's: forward under autocast, task loss
(structure loss) + auxiliary loss, backward (through the grad scaler), clipping at 1.0, AdamW step. Timing and
memory use the engine's own `profile.Timer` and `profile.peak_memory_mb`, as `samfit run` does.

Peak memory is measured for each configuration in a fresh subprocess that builds the model, resets the peak
(`profile.reset_peak_memory`), and trains `warmup + 2` steps: on CUDA the max allocated memory (model
included); on CPU the peak resident set size above the RSS after building the model. In one process, the
peak of the method measured first would hide the peaks of the others.

`--data DATASET` times the input pipeline instead of the model: read + decode + resize + normalise in
DataLoader workers (pinned memory on CUDA, persistent workers), plus the engine's flip, in images/s, so you
can see whether loading keeps up with the training step.
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
from pathlib import Path

import torch

import samfit
from samfit.engine.profile import Timer, peak_memory_kind, peak_memory_mb, reset_peak_memory, synchronize
from samfit.errors import SamfitError
from samfit.model.attention import set_attention
from samfit.model.checkpointing import set_grad_checkpoint

BASELINE = "lora"
MEMORY_STEPS = 2


@dataclass(frozen=True)
class Setting:
    """One configuration of the benchmark."""

    method: str
    attention: str = "sdpa"
    precision: str = "fp32"
    grad_checkpoint: bool = False

    @property
    def label(self) -> str:
        extras = [self.attention, self.precision] + (["grad-ckpt"] if self.grad_checkpoint else [])
        return f"{self.method} ({', '.join(extras)})"


@dataclass(frozen=True)
class Shape:
    model: str
    image_size: int
    batch: int
    device: str


def parse_methods(text: str) -> list[str]:
    known = samfit.list_methods()
    if text.strip() == "none":
        return []
    names = known if text.strip() == "all" else [m.strip() for m in text.split(",") if m.strip()]
    for name in names:
        samfit.get_method(name)  # an unknown name raises with a suggestion
    return names


def build(setting: Setting, shape: Shape, seed: int = 0):
    """(model, optimizer, grad scaler, autocast factory) for one configuration, on the device."""
    from samfit.engine.train import autocast_for

    device = torch.device(shape.device)
    torch.manual_seed(seed)
    model = samfit.get_method(setting.method).apply(samfit.build_model(shape.model, image_size=shape.image_size))
    set_grad_checkpoint(set_attention(model, setting.attention), setting.grad_checkpoint)
    model.to(device)
    autocast, _, use_scaler = autocast_for(setting.precision, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-4)
    return model, optimizer, torch.amp.GradScaler(device.type, enabled=use_scaler), autocast


def synthetic_batch(shape: Shape, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = shape.image_size
    images = torch.randn(shape.batch, 3, s, s, generator=g)
    targets = (torch.rand(shape.batch, 1, s, s, generator=g) > 0.5).float()
    device = torch.device(shape.device)
    return images.to(device), targets.to(device)


class Bench:
    """A built configuration that can take timed training steps and evaluation batches."""

    def __init__(self, setting: Setting, shape: Shape):
        from samfit.losses import get_loss

        self.setting, self.shape = setting, shape
        self.model, self.optimizer, self.scaler, self.autocast = build(setting, shape)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.images, self.targets = synthetic_batch(shape)
        self.loss = get_loss("structure")
        device = torch.device(shape.device)
        self.train_timer, self.eval_timer = Timer(device), Timer(device)

    def train_step(self) -> None:
        self.model.train()
        with self.autocast():
            out = self.model(self.images)
            loss = self.loss(out["logits"].float(), self.targets) + out["aux_loss"].float()
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def eval_batch(self) -> None:
        self.model.eval()
        with self.autocast():
            self.model(self.images)["logits"].float().sigmoid()

    def run(self, kind: str) -> None:
        if kind == "train":
            self.train_step()
        else:
            self.eval_batch()

    def timed(self, kind: str) -> None:
        timer = self.train_timer if kind == "train" else self.eval_timer
        with timer:
            self.run(kind)
        timer.add_images(self.shape.batch)

    def record(self, peak_mb: float | None) -> dict:
        s = self.setting
        return {"method": s.method, "step_time_s": self.train_timer.median,
                "train_img_per_s": self.train_timer.images_per_s, "eval_img_per_s": self.eval_timer.images_per_s,
                "eval_batch_time_s": self.eval_timer.median, "peak_memory_mb": peak_mb,
                "trainable_params": samfit.count_parameters(self.model)["trainable"], "attention": s.attention,
                "precision": s.precision, "grad_checkpoint": s.grad_checkpoint, "device": self.shape.device,
                "model": self.shape.model, "image_size": self.shape.image_size, "batch": self.shape.batch,
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
        for line in Path("/proc/cpuinfo").read_text().splitlines():
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
              precisions=("fp32",), checkpoints=(False,), memory: bool = True, log=print) -> tuple[list[dict], dict]:
    """Benchmark every combination; returns (records, meta)."""
    if steps < 1 or warmup < 0:
        raise SamfitError("--steps must be >= 1 and --warmup >= 0.")
    settings = [Setting(m, a, p, c) for m, a, p, c in itertools.product(methods, attentions, precisions, checkpoints)]
    meta = {"machine": machine(), "load_before": load_average(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "steps": steps, "warmup": warmup, "memory_steps": warmup + MEMORY_STEPS,
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
    return [b.record(peaks.get(b.setting)) for b in benches], meta


def add_ratios(records: list[dict]) -> list[dict]:
    """Every figure as a ratio to LoRA's (the first LoRA record: the first listed attention/precision/ckpt)."""
    base = next((r for r in records if r["method"] == BASELINE), None)
    for r in records:
        for key in ("step_time_s", "train_img_per_s", "eval_img_per_s", "peak_memory_mb", "trainable_params"):
            ok = base is not None and r.get(key) is not None and base.get(key)
            r[f"{key}_vs_lora"] = r[key] / base[key] if ok else None
    return records


def _fmt(value, digits=2) -> str:
    if value is None:
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def markdown(records: list[dict], meta: dict, data: dict | None = None) -> str:
    lines = []
    if records:
        m = meta["machine"]
        lines += [f"# samfit bench: {meta['model']}, {meta['image_size']} px, batch {meta['batch']}, {meta['device']}",
                  "", f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} thread(s))"
                  + (f", GPU {m['gpu']}" if "gpu" in m else "") + f". Load average (1, 5, 15 min) before "
                  f"{meta['load_before']}, after {meta['load_after']}. {meta['steps']} timed steps after "
                  f"{meta['warmup']} warm-up steps, round-robin; step time is the median. Peak memory: "
                  f"{meta['peak_memory_kind']}, a fresh process per row, {meta['memory_steps']} steps.", ""]
        head = ["method", "attention", "precision", "grad ckpt", "step s", "step × LoRA", "train img/s",
                "eval img/s", "eval × LoRA", "peak MB", "peak × LoRA", "trainable", "trainable × LoRA"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (len(head) - 4)]
        for r in records:
            cells = [r["method"], r["attention"], r["precision"], "on" if r["grad_checkpoint"] else "off",
                     _fmt(r["step_time_s"], 3), _fmt(r["step_time_s_vs_lora"]), _fmt(r["train_img_per_s"]),
                     _fmt(r["eval_img_per_s"]), _fmt(r["eval_img_per_s_vs_lora"]), _fmt(r["peak_memory_mb"], 0),
                     _fmt(r["peak_memory_mb_vs_lora"]), _fmt(r["trainable_params"]),
                     _fmt(r["trainable_params_vs_lora"])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if data:
        lines += [f"Data loading ({data['dataset']}, split {data['split']}, {data['image_size']} px): "
                  f"{data['img_per_s']:.1f} images/s with {data['num_workers']} workers (read, decode, resize, "
                  f"normalise, flip; batch {data['batch']}, {data['images']} images timed).", ""]
    return "\n".join(lines)


def data_throughput(dataset: str, image_size: int, batch: int, num_workers: int, batches: int, device: str,
                    data_root: str | None = None, datasets_file: str | None = None) -> dict:
    """Images/s of the engine's input pipeline on a dataset's training split."""
    from torch.utils.data import DataLoader

    from samfit.data import SegmentationFolder, ensure_available, resolve_dataset, split_pairs
    from samfit.engine.train import EpochSampler, epoch_order, flip_batch

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


def write_outputs(out: Path, records: list[dict], meta: dict, data: dict | None) -> Path:
    from samfit.engine import rundir

    out = Path(out)
    if records:
        rundir.write_json(out / "bench.json", records)
        rundir.write_json(out / "bench_meta.json", meta)
    if data:
        rundir.write_json(out / "data.json", data)
    rundir.write_text(out / "bench.md", markdown(records, meta, data) + "\n")
    return out / "bench.md"


def _choices(option: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise SamfitError(f"{option} {text!r}: give one or more of {', '.join(allowed)}, comma-separated.")
    return values


def bench(methods: str, model: str, image_size: int, batch: int, steps: int, out: str | Path, warmup: int = 2,
          attention: str = "sdpa", precision: str = "fp32", grad_checkpoint: str = "off", device: str = "auto",
          memory: bool = True, data: str | None = None, num_workers: int = 2, data_batches: int = 20,
          data_root: str | None = None, datasets_file: str | None = None, threads: int | None = None,
          log=print) -> tuple[Path, str]:
    """`samfit bench`: measure, write DIR/bench.json, bench_meta.json, data.json, bench.md; returns (path, text).
    attention, precision and grad_checkpoint ("off", "on" or "off,on") may list several values: every
    combination is measured in the same round-robin. `threads` sets torch's intra-op threads (on a CPU shared
    with other work, fewer threads than cores avoids OpenMP threads waiting for each other)."""
    from samfit.engine.train import pick_device, resolve_precision
    from samfit.model.sam import check_image_size, get_variant

    get_variant(model)
    check_image_size(image_size)
    if threads is not None:
        if threads < 1:
            raise SamfitError(f"--threads {threads}: must be >= 1.")
        torch.set_num_threads(threads)
    dev = pick_device(device)
    shape = Shape(model, image_size, batch, dev.type)
    attentions = _choices("--attention", attention, ("sdpa", "reference"))
    precisions = [resolve_precision(p, dev)
                  for p in _choices("--precision", precision, ("auto", "fp32", "bf16", "fp16"))]
    checkpoints = [v == "on" for v in _choices("--grad-checkpoint", grad_checkpoint, ("off", "on"))]
    names = parse_methods(methods)
    if not names and not data:
        raise SamfitError("Nothing to measure: give --methods and/or --data.")
    records, meta = run_bench(names, shape, steps, warmup, attentions, precisions, checkpoints, memory, log) \
        if names else ([], {})
    data_result = data_throughput(data, image_size, batch, num_workers, data_batches, dev.type, data_root,
                                  datasets_file) if data else None
    path = write_outputs(out, add_ratios(records), meta, data_result)
    return path, path.read_text()


def _probe(payload: str) -> None:
    """Subprocess entry: print {"peak_memory_mb": …} for one configuration."""
    spec = json.loads(payload)
    torch.set_num_threads(spec["threads"])
    peak = measure_peak_memory(Setting(**spec["setting"]), Shape(**spec["shape"]), spec["steps"])
    print(json.dumps({"peak_memory_mb": peak}))


if __name__ == "__main__":
    _probe(sys.argv[1])
