"""Which images pick the best epoch: a val split when there is one, else a fixed held-out share of train."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from samfit.data import resolve_dataset, selection_pairs
from samfit.data.registry import DatasetSpec
from samfit.errors import SamfitError


def canonical(root: Path, counts: dict[str, int]) -> Path:
    for split, n in counts.items():
        for i in range(n):
            for kind, value in (("images", 100), ("masks", 255)):
                (root / split / kind).mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(root / split / kind / f"{split}{i:03d}.png"), np.full((8, 8), value, np.uint8))
    return root


def stems(pairs):
    return [image.stem for image, _ in pairs]


def test_without_val_a_fixed_tenth_of_train_is_held_out(tmp_path):
    folder = canonical(tmp_path / "polyp", {"train": 45, "kvasir": 3})
    spec = DatasetSpec(name="polyp", val=None, test=["kvasir"])
    train, held, selection = selection_pairs(spec, folder)
    assert len(held) == round(0.1 * 45) == 4 and len(train) == 41
    assert set(stems(train)).isdisjoint(stems(held)) and sorted(stems(train) + stems(held)) == \
        [f"train{i:03d}" for i in range(45)]
    assert not any(s.startswith("kvasir") for s in stems(held))  # never a test set
    assert selection == {"split": "train (held out)", "held_out": 4, "val_fraction": 0.1}
    # the same images every time (every method and seed); a permutation seeded with 0 over the sorted names
    again = selection_pairs(spec, folder)[1]
    expected = sorted(np.random.default_rng(0).permutation(45)[:4].tolist())
    assert stems(again) == stems(held) == [f"train{i:03d}" for i in expected]


def test_val_fraction_and_the_minimum_of_one_image(tmp_path):
    folder = canonical(tmp_path / "d", {"train": 5, "test": 1})
    _, held, _ = selection_pairs(DatasetSpec(name="d", val=None, val_fraction=0.4), folder)
    assert len(held) == 2
    _, held, _ = selection_pairs(DatasetSpec(name="d", val=None), folder)  # round(0.5) = 0 -> at least one
    assert len(held) == 1
    single = canonical(tmp_path / "one", {"train": 1, "test": 1})
    with pytest.raises(SamfitError, match="no val split and 1 training image"):
        selection_pairs(DatasetSpec(name="one", val=None), single)


def test_a_prepared_val_folder_is_used_when_the_entry_declares_none(tmp_path):
    folder = canonical(tmp_path / "leaf", {"train": 6, "val": 2, "test": 2})
    train, held, selection = selection_pairs(DatasetSpec(name="leaf", val=None), folder)
    assert (len(train), stems(held), selection) == (6, ["val000", "val001"], {"split": "val"})


def test_a_folder_whose_only_eval_split_is_val_tests_on_val_and_selects_on_train(tmp_path):
    folder = canonical(tmp_path / "mine", {"train": 10, "val": 2})
    spec = resolve_dataset(str(folder))
    assert spec.test == ["val"] and spec.val is None
    _, held, selection = selection_pairs(spec, folder)
    assert stems(held)[0].startswith("train") and selection["split"] == "train (held out)"
