"""The dataset registry: datasets.yaml entries, user registries, and folders/CSVs given directly.

Canonical layout (what `samfit data prepare` writes and what training reads):
    <data_root>/<name>/<split>/images/<stem>.{png,jpg}
    <data_root>/<name>/<split>/masks/<stem>.png     uint8; binary 0/255, multi-class class index, 255 = ignore
data_root = --data-root, else $SAMFIT_DATA, else ~/.cache/samfit/data.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from samfit.errors import SamfitError, unknown_name

BUILTIN_REGISTRY = Path(__file__).resolve().parents[2] / "datasets.yaml"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")  # read as images, canonical or official


@dataclass
class DatasetSpec:
    name: str
    task: str = "binary"
    classes: list[str] = field(default_factory=lambda: ["background", "foreground"])
    train: str | None = "train"
    val: str | None = "val"
    test: list[str] = field(default_factory=lambda: ["test"])
    metrics: list[str] = field(default_factory=lambda: ["iou_per_image", "iou_dataset", "dice_per_image",
                                                          "dice_dataset"])
    headline: str = "iou_per_image"
    lower_is_better: bool = False
    val_fraction: float = 0.1  # without a val split: share of train held out to pick the best checkpoint
    loss: str = "structure"
    epochs: int = 20
    lr: float = 1e-4
    image_size: int = 1024
    synthetic: dict | None = None
    source: dict = field(default_factory=dict)
    downloads: list = field(default_factory=list)
    root: Path | None = None  # where the canonical layout lives (set for folder / CSV datasets)
    csv: dict[str, Path] = field(default_factory=dict)  # split -> CSV of image,label pairs
    missing_tests: list[str] = field(default_factory=list)  # test sets the prepared download lacks

    @property
    def num_classes(self) -> int:
        return 1 if self.task == "binary" else len(self.classes)

    @property
    def eval_splits(self) -> list[str]:
        """The test sets to score: every declared one the prepared data holds (`ensure_available` records
        those a download lacks in `missing_tests`, e.g. the Conv-LoRA code's polyp zip has 2 of 5)."""
        return [t for t in self.test if t not in self.missing_tests]



def data_root(override: str | Path | None = None) -> Path:
    if override:
        return Path(override).expanduser()
    return Path(os.environ.get("SAMFIT_DATA", Path.home() / ".cache" / "samfit" / "data")).expanduser()


def _spec_from_entry(name: str, entry: dict, origin: Path) -> DatasetSpec:
    entry = dict(entry)
    splits = entry.pop("splits", {}) or {}
    known = set(DatasetSpec.__dataclass_fields__) - {"name", "root", "csv", "train", "val", "test"}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise SamfitError(f"{origin}: dataset '{name}' has unknown keys {unknown}. Valid: {sorted(known)}.")
    if entry.get("task", "binary") not in ("binary", "multiclass"):
        raise SamfitError(f"{origin}: dataset '{name}': task must be 'binary' or 'multiclass'.")
    test = splits.get("test", ["test"])
    spec = DatasetSpec(name=name, train=splits.get("train", "train"), val=splits.get("val", "val"),
                       test=[test] if isinstance(test, str) else list(test), **entry)
    if spec.headline not in spec.metrics:
        spec.metrics = [spec.headline] + list(spec.metrics)
    return spec


def load_registry(extra_file: str | Path | None = None) -> dict[str, DatasetSpec]:
    """datasets.yaml shipped with samfit, then a user's --datasets-file (its entries win)."""
    specs: dict[str, DatasetSpec] = {}
    files = [BUILTIN_REGISTRY] + ([Path(extra_file)] if extra_file else [])
    for path in files:
        if not path.is_file():
            raise SamfitError(f"Datasets file not found: {path}.")
        try:
            entries = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise SamfitError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(entries, dict):
            raise SamfitError(f"{path} must map dataset names to entries.")
        for name, entry in entries.items():
            specs[name] = _spec_from_entry(name, entry or {}, path)
    return specs


def _spec_from_folder(path: Path) -> DatasetSpec:
    splits = sorted(p.name for p in path.iterdir() if (p / "images").is_dir())
    if "train" not in splits:
        raise SamfitError(
            f"Folder {path} is not in samfit's canonical layout: expected {path}/train/images and "
            f"{path}/train/masks (and val/, test/ alike)."
        )
    tests = [s for s in splits if s not in ("train", "val")]
    # without a test split, val is the test set and the best epoch is picked on a held-out share of train
    return DatasetSpec(name=path.name, train="train", val="val" if "val" in splits and tests else None,
                       test=tests or (["val"] if "val" in splits else ["train"]), root=path)


def _spec_from_csv(path: Path) -> DatasetSpec:
    folder = path.parent
    csvs = {p.stem: p for p in folder.glob("*.csv")}
    tests = sorted(s for s in csvs if s.startswith("test"))
    split = {"train": path}
    split.update({s: csvs[s] for s in ["val"] + tests if s in csvs})
    return DatasetSpec(name=folder.name, train="train", val="val" if "val" in csvs and tests else None,
                       test=tests or (["val"] if "val" in csvs else ["train"]), root=folder, csv=split)


def resolve_dataset(name: str, datasets_file: str | Path | None = None) -> DatasetSpec:
    """A registry name, a folder in the canonical layout, or a train CSV with image,label columns."""
    path = Path(name).expanduser()
    if path.suffix == ".csv" and path.is_file():
        return _spec_from_csv(path)
    if path.is_dir():
        return _spec_from_folder(path)
    specs = load_registry(datasets_file)
    if name not in specs:
        raise unknown_name("dataset", name, specs)
    return specs[name]


def dataset_dir(spec: DatasetSpec, root: str | Path | None = None) -> Path:
    return spec.root if spec.root is not None else data_root(root) / spec.name


def ensure_available(spec: DatasetSpec, root: str | Path | None = None) -> Path:
    """Generate a synthetic set on first use; for real sets, check the layout is there or say how to get it."""
    folder = dataset_dir(spec, root)
    if spec.csv:
        return folder
    if spec.synthetic is not None:
        from samfit.data.shapes import generate

        generate(spec, folder)
        return folder
    needed = [s for s in [spec.train, spec.val] if s]
    present = lambda s: (folder / s / "images").is_dir() and (folder / s / "masks").is_dir()  # noqa: E731
    missing = [s for s in needed if not present(s)]
    tests = [t for t in spec.test if present(t)]
    if missing or not tests:
        missing += [t for t in spec.test if not present(t)]
        how = (f"  samfit data download {spec.name}\nor, with the official files downloaded by hand,\n"
               if spec.downloads else "")
        raise SamfitError(
            f"Dataset '{spec.name}' is not prepared: {folder} lacks split(s) {', '.join(missing)}.\n"
            f"Expected layout: {folder}/<split>/images/*.png|jpg and {folder}/<split>/masks/*.png "
            f"for splits {', '.join(needed)} and at least one of the test sets {', '.join(spec.test)}.\n"
            f"Get it with\n{how}"
            f"  samfit data prepare {spec.name} --source PATH_TO_OFFICIAL_ZIP_OR_FOLDER\n"
            f"(data root: {folder.parent}; set SAMFIT_DATA or --data-root to use another)."
        )
    spec.missing_tests = [t for t in spec.test if t not in tests]
    return folder


def missing_tests_note(spec: DatasetSpec) -> str | None:
    """One line saying which test sets are scored and which the prepared download lacks (None if none)."""
    if not spec.missing_tests:
        return None
    return (f"dataset '{spec.name}': scoring the test set(s) {', '.join(spec.eval_splits)}; the prepared data "
            f"lacks {', '.join(spec.missing_tests)} (not in the download; prepare the full official download to "
            f"score them). Their table cells stay empty.")
