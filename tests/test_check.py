"""check_dataset on canonical folders: reports, and the first offending file named in every error."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from rich.table import Table

from samfit.data.check import SplitReport, check_dataset, render_reports
from samfit.errors import SamfitError

BINARY = ["background", "lesion"]
TRANS = ["background", "things", "stuff"]


def save(path: Path, array: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return path


def canonical(root: Path, splits: dict[str, list[np.ndarray]]) -> Path:
    """<root>/<split>/{images/<i>.jpg|png, masks/<i>.png} with the given masks."""
    for split, masks in splits.items():
        for i, mask in enumerate(masks):
            h, w = mask.shape
            image = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
            save(root / split / "images" / f"s{i}.{'jpg' if i % 2 else 'png'}", image)
            save(root / split / "masks" / f"s{i}.png", mask)
    return root


def binary(h=20, w=24, on=True) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    if on:
        m[3:10, 4:12] = 255
    return m


def test_binary_report(tmp_path):
    root = canonical(tmp_path / "ds", {"train": [binary(), binary(30, 16), binary(on=False)],
                                       "val": [binary()], "kvasir": [binary(on=False)]})
    reports = check_dataset(root, BINARY, "binary")
    assert [r.split for r in reports] == ["train", "val", "kvasir"]
    train = reports[0]
    assert (train.images, train.masks) == (3, 3)
    assert train.min_size == (16, 20) and train.max_size == (24, 30)
    assert train.mask_values == [0, 255]
    assert train.class_images == {"background": 3, "lesion": 2}
    assert reports[2].classes_present == ["background"]
    table = render_reports(reports)
    assert isinstance(table, Table) and table.row_count == 3
    console = Console(record=True, width=140)
    console.print(table)
    text = console.export_text()
    assert "16x20 .. 24x30" in text and "lesion (2)" in text


def test_multiclass_report_allows_ignore(tmp_path):
    m = np.zeros((20, 24), np.uint8)
    m[:5] = 1
    m[5:8] = 2
    m[0, 0] = 255
    reports = check_dataset(canonical(tmp_path / "ds", {"test": [m]}), TRANS, "multiclass", splits=["test"])
    assert reports[0].mask_values == [0, 1, 2, 255]
    assert reports[0].classes_present == TRANS


def test_image_without_mask(tmp_path):
    root = canonical(tmp_path / "ds", {"train": [binary(), binary()]})
    (root / "train" / "masks" / "s1.png").unlink()
    with pytest.raises(SamfitError, match=r"Image without mask: .*train/images/s1\.jpg"):
        check_dataset(root, BINARY, "binary")


def test_mask_without_image(tmp_path):
    root = canonical(tmp_path / "ds", {"train": [binary(), binary()]})
    (root / "train" / "images" / "s0.png").unlink()
    with pytest.raises(SamfitError, match=r"Mask without image: .*train/masks/s0\.png"):
        check_dataset(root, BINARY, "binary")


def test_corrupt_image_bytes(tmp_path):
    root = canonical(tmp_path / "ds", {"val": [binary(), binary()]})
    path = root / "val" / "images" / "s1.jpg"
    path.write_bytes(path.read_bytes()[:200])  # truncated JPEG
    with pytest.raises(SamfitError, match=r"Unreadable image .*val/images/s1\.jpg"):
        check_dataset(root, BINARY, "binary")


def test_unreadable_mask(tmp_path):
    root = canonical(tmp_path / "ds", {"val": [binary()]})
    (root / "val" / "masks" / "s0.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(SamfitError, match=r"Unreadable mask .*val/masks/s0\.png"):
        check_dataset(root, BINARY, "binary")


def test_size_mismatch(tmp_path):
    root = canonical(tmp_path / "ds", {"test": [binary(), binary()]})
    save(root / "test" / "masks" / "s1.png", binary(20, 23))
    with pytest.raises(SamfitError, match=r"test/masks/s1\.png is 23x20 but its image .*s1\.jpg is 24x20"):
        check_dataset(root, BINARY, "binary")


def test_illegal_binary_values(tmp_path):
    m = binary()
    m[0, 0] = 128
    root = canonical(tmp_path / "ds", {"train": [binary(), m]})
    with pytest.raises(SamfitError, match=r"train/masks/s1\.png holds illegal values \[128\]"):
        check_dataset(root, BINARY, "binary")


def test_illegal_multiclass_values(tmp_path):
    m = np.zeros((20, 24), np.uint8)
    m[1, 1] = 3
    m[2, 2] = 255
    root = canonical(tmp_path / "ds", {"train": [m]})
    with pytest.raises(SamfitError, match=r"s0\.png holds illegal values \[3\]: class indices 0\.\.2"):
        check_dataset(root, TRANS, "multiclass")


def test_rgb_mask_is_refused(tmp_path):
    root = canonical(tmp_path / "ds", {"train": [binary()]})
    save(root / "train" / "masks" / "s0.png", np.dstack([binary()] * 3))
    with pytest.raises(SamfitError, match=r"s0\.png has PIL mode RGB"):
        check_dataset(root, BINARY, "binary")


def test_missing_splits_and_folders(tmp_path):
    root = canonical(tmp_path / "ds", {"train": [binary()]})
    with pytest.raises(SamfitError, match="lacks the split folder.*kvasir"):
        check_dataset(root, BINARY, "binary", splits=["train", "kvasir"])
    with pytest.raises(SamfitError, match="does not exist.*samfit data prepare"):
        check_dataset(tmp_path / "nothing", BINARY, "binary")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SamfitError, match="no split folders"):
        check_dataset(tmp_path / "empty", BINARY, "binary")
    with pytest.raises(SamfitError, match="Unknown task"):
        check_dataset(root, BINARY, "semantic")


def test_progress_bar_and_report_type(tmp_path):
    root = canonical(tmp_path / "ds", {"train": [binary()]})
    reports = check_dataset(root, BINARY, "binary", progress=True)
    assert isinstance(reports[0], SplitReport)
