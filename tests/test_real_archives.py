"""The archives people actually download, built small: mirrors that nest folders, the Conv-LoRA code's zips
that lack test sets, renamed folders, Mnih's road layout, Trans10K in three zips, the AutoGluon fixture, the
original Kvasir-SEG zip, archive junk and upper-case names. Each is prepared, and its pairs and splits checked."""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_prepare import (Expect, binary_mask, build_cod, build_csv_zip_tree, build_isic, build_polyp, build_sbu,
                          build_trans10k_v1, photo, save, zip_folder)

from samfit.data import ensure_available, resolve_dataset, selection_pairs
from samfit.data.check import check_dataset
from samfit.data.prepare import prepare_dataset
from samfit.errors import SamfitError


def add_junk(root: Path) -> None:
    """What archives made on macOS / Windows carry beside the data."""
    for folder in [root] + [d for d in root.rglob("*") if d.is_dir()][:3]:
        (folder / ".DS_Store").write_bytes(b"\0junk")
        (folder / "Thumbs.db").write_bytes(b"\0junk")
    (root / "__MACOSX" / "x").mkdir(parents=True)
    (root / "__MACOSX" / "x" / "._1.png").write_bytes(b"\0junk")
    for image in list(root.rglob("*.jpg"))[:2]:
        (image.parent / f"._{image.name}").write_bytes(b"\0junk")


def prepared_pairs(out: Path) -> dict[str, list[str]]:
    return {d.name: sorted(p.stem for p in (d / "images").iterdir()) for d in sorted(out.iterdir()) if d.is_dir()}


def test_isic_kaggle_mirror_doubly_nested_with_junk_as_zip(tmp_path):
    expect = build_isic(tmp_path / "flat")
    mirror = tmp_path / "mirror" / "archive"
    for folder in (tmp_path / "flat").iterdir():  # ISIC-2017_Training_Data/ISIC-2017_Training_Data/...
        shutil.copytree(folder, mirror / folder.name / folder.name)
    add_junk(tmp_path / "mirror")
    archive = zip_folder(tmp_path / "mirror", tmp_path / "isic-2017.zip")
    out = prepare_dataset("isic2017", archive, tmp_path / "data", progress=False)
    expect.verify(out)
    reports = check_dataset(out, ["background", "lesion"], "binary", splits=["train", "val", "test"])
    assert [(r.split, r.images) for r in reports] == [("train", 2), ("val", 2), ("test", 2)]


def test_isic_autogluon_fixture_layout_with_upper_case_names(tmp_path):
    e = Expect()
    for k, (split, folder) in enumerate([("train", "ISIC-2017_Train"), ("val", "ISIC-2017_Val"),
                                         ("test", "ISIC-2017_Test")]):
        for i in range(2):
            stem = f"ISIC_{k * 10 + i:07d}"
            image = save(tmp_path / "src" / "isic2017" / split / folder / f"{stem}.JPG", photo(k + i), fmt="JPEG")
            mask_name = f"{stem}_Segmentation.PNG" if i else f"{stem}_segmentation.png"
            save(tmp_path / "src" / "isic2017" / split / f"{folder}_GroundTruth" / mask_name, binary_mask(k + i),
                 fmt="PNG")
            e.add(split, stem, image, binary_mask(k + i))
    out = prepare_dataset("isic2017", tmp_path / "src", tmp_path / "data", progress=False)
    assert prepared_pairs(out) == {s: sorted(v) for s, v in e.splits.items()}
    for split, items in e.splits.items():
        for stem, (source, mask, _) in items.items():
            assert (out / split / "images" / f"{stem}.jpg").read_bytes() == source.read_bytes()
            assert np.array_equal(np.asarray(Image.open(out / split / "masks" / f"{stem}.png")), mask)


@pytest.mark.parametrize("dataset, missing", [("polyp", ["cvc-colondb", "etis", "cvc-300"]),
                                              ("cod", ["cod10k", "chameleon"])])
def test_conv_lora_zip_lacking_test_sets_prepares_checks_and_selects(dataset, missing, tmp_path, data_root, cli):
    if dataset == "polyp":
        build_csv_zip_tree(tmp_path / "src")
        archive = zip_folder(tmp_path / "src" / "polyp", tmp_path / "polyp.zip")
        present = ["kvasir", "cvc-clinicdb"]
    else:  # camo_sem_seg: train.csv, val.csv, test_CAMO.csv
        base = tmp_path / "src" / "camo_sem_seg"
        for csv_name in ("train", "val", "test_CAMO"):
            rows = ["image,label"]
            for i in range(2):
                save(base / csv_name / "images" / f"{csv_name}{i}.jpg", photo(i))
                save(base / csv_name / "masks" / f"{csv_name}{i}.png", binary_mask(i))
                rows.append(f"{csv_name}/images/{csv_name}{i}.jpg,{csv_name}/masks/{csv_name}{i}.png")
            (base / f"{csv_name}.csv").write_text("\n".join(rows) + "\n")
        archive = zip_folder(tmp_path / "src", tmp_path / "camo_sem_seg.zip")
        present = ["camo"]
    out = prepare_dataset(dataset, archive, data_root, progress=False)
    assert sorted(prepared_pairs(out)) == sorted(["train", "val", *present])
    spec = resolve_dataset(dataset)
    assert ensure_available(spec) == out
    assert spec.eval_splits == present and spec.missing_tests == missing
    train, selection, how = selection_pairs(spec, out)
    assert how == {"split": "val"} and len(train) == 2 and len(selection) == 2  # the zip's val picks the epoch
    code, stdout, error = cli("data", "check", dataset)
    assert code == 0, error
    assert all(s in stdout for s in present) and "every split is consistent" in stdout


@pytest.mark.slow  # a 1-epoch tiny run on the prepared data (~5 s)
@pytest.mark.parametrize("dataset, removed", [("polyp", ["CVC-ColonDB", "ETIS-LaribPolypDB", "CVC-300"]),
                                              ("cod", ["COD10K"])])
def test_folder_download_lacking_test_sets_prepares_and_runs_on_those_present(dataset, removed, tmp_path, data_root):
    """PraNet's polyp TestDataset/ and SINet-V2's COD TestDataset/ with some test set folders absent (downloaded
    one by one, or not at all): prepared, checked and scored on the sets present; the others named."""
    from typer.testing import CliRunner

    from samfit.cli import app
    from samfit.config import make_config
    from samfit.engine.train import run

    expect = (build_polyp if dataset == "polyp" else build_cod)(tmp_path / "src")
    sets = next(p for p in (tmp_path / "src").rglob("TestDataset") if not (p / "TestDataset").is_dir())
    for name in removed:
        shutil.rmtree(sets / name)
        expect.splits.pop({"ETIS-LaribPolypDB": "etis"}.get(name, name.lower()))
    add_junk(tmp_path / "src")
    archive = zip_folder(tmp_path / "src", tmp_path / f"{dataset}.zip")
    result = CliRunner().invoke(app, ["data", "prepare", dataset, "--source", str(archive)])
    assert result.exit_code == 0, result.output
    spec = resolve_dataset(dataset)
    missing = [t for t in spec.test if t not in expect.splits]
    present = [t for t in spec.test if t in expect.splits]
    assert len(missing) == len(removed) and present
    said = " ".join(result.output.split())
    assert f"lacks {', '.join(missing)}" in said and f"scoring the test set(s) {', '.join(present)}" in said
    out = data_root / dataset
    expect.verify(out)  # every pair of the sets present, and no folder for the absent ones
    assert ensure_available(spec) == out and spec.eval_splits == present and spec.missing_tests == missing
    train, selection, how = selection_pairs(spec, out)  # no val folder: a fixed share of train picks the epoch
    assert len(train) + len(selection) == len(expect.splits["train"]) and len(selection) >= 1
    result = CliRunner().invoke(app, ["data", "check", dataset])
    assert result.exit_code == 0 and "every split is consistent" in result.output, result.output
    folder = run(make_config(method="decoder-only", dataset=dataset, model="tiny", image_size=32, epochs=1,
                             batch_size=1, effective_batch=1, device="cpu", out=str(tmp_path / "runs")), quiet=True)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert sorted(metrics["scores"]) == sorted(present) and metrics["missing_test_sets"] == missing


def test_a_test_set_folder_without_its_masks_is_refused_by_name(tmp_path):
    build_polyp(tmp_path / "src")
    broken = tmp_path / "src" / "TestDataset" / "TestDataset" / "ETIS-LaribPolypDB"
    shutil.rmtree(broken / "masks")
    with pytest.raises(SamfitError) as e:
        prepare_dataset("polyp", tmp_path / "src", tmp_path / "data", progress=False)
    assert f"The test set folder {broken} lacks its images/ or masks/ folder (it holds images)" in str(e.value)
    assert not (tmp_path / "data" / "polyp").exists()


def test_missing_every_test_set_is_still_refused(tmp_path, data_root):
    build_csv_zip_tree(tmp_path / "src")
    out = prepare_dataset("polyp", tmp_path / "src", data_root, progress=False)
    for split in ("kvasir", "cvc-clinicdb"):
        shutil.rmtree(out / split)
    with pytest.raises(SamfitError, match="at least one of the test sets kvasir, cvc-clinicdb"):
        ensure_available(resolve_dataset("polyp"))


def test_table_leaves_cells_of_missing_test_sets_empty(tmp_path):
    from samfit.report import collect_runs, comparison_grid, summarise

    for method, sets in [("lora", ["kvasir", "cvc-clinicdb", "etis"]), ("conv-lora", ["kvasir", "cvc-clinicdb"])]:
        folder = tmp_path / method
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps({
            "method": method, "dataset": "polyp", "model": "vit_h", "image_size": 1024, "seed": 0, "device": "cpu",
            "headline": {"metric": "s_measure", "lower_is_better": False, "value": 0.9, "split": "kvasir"},
            "scores": {s: {"s_measure": 0.9} for s in sets}, "missing_test_sets": [],
            "params": {"trainable": 1, "encoder_trainable": 0, "percent_of_sam": 0.1},
            "throughput": {"train_img_per_s": 1.0, "step_time_s": 1.0, "eval_img_per_s": 1.0},
            "peak_memory_mb": 1.0}))
    grid = comparison_grid(summarise(collect_runs(tmp_path))).set_index("method")
    assert grid.loc["conv-lora", "polyp/etis s_measure"] == "—"
    assert grid.loc["lora", "polyp/etis s_measure"].startswith("90.00")


def test_sbu_test_rename_folder(tmp_path):
    expect = build_sbu(tmp_path / "src")
    (tmp_path / "src" / "SBU-shadow" / "SBU-Test").rename(tmp_path / "src" / "SBU-shadow" / "SBU-Test_rename")
    expect.splits["test"] = {stem: (Path(str(image).replace("SBU-Test", "SBU-Test_rename")), mask, kept)
                             for stem, (image, mask, kept) in expect.splits["test"].items()}
    out = prepare_dataset("sbu", tmp_path / "src", tmp_path / "data", progress=False)
    expect.verify(out)


def test_refusal_names_the_folder_the_expectation_and_the_nearest_find(tmp_path):
    build_sbu(tmp_path / "src")
    (tmp_path / "src" / "SBU-shadow" / "SBU-Test").rename(tmp_path / "src" / "SBU-shadow" / "SBU-Tset")
    with pytest.raises(SamfitError) as e:
        prepare_dataset("sbu", tmp_path / "src", tmp_path / "data", progress=False)
    message = str(e.value)
    assert f"looked in {tmp_path / 'src'}" in message and "SBU-Test" in message
    assert f"nearest folder found is {tmp_path / 'src' / 'SBU-shadow' / 'SBU-Tset'}" in message
    save(tmp_path / "other" / "Kvasir_SEG_v2" / "a.png", photo(0))
    with pytest.raises(SamfitError) as e:
        prepare_dataset("kvasir-seg", tmp_path / "other", tmp_path / "data", progress=False)
    assert f"looked in {tmp_path / 'other'}" in str(e.value) and "Kvasir-SEG/{images,masks}" in str(e.value)
    assert f"nearest folder found is {tmp_path / 'other' / 'Kvasir_SEG_v2'}" in str(e.value)


def test_massachusetts_roads_in_mnih_layout(tmp_path):
    e = Expect()
    for k, (official, split) in enumerate([("train", "train"), ("valid", "val"), ("test", "test")]):
        stem = f"1007866{k}_15"
        image = save(tmp_path / "src" / "mass_roads" / official / "sat" / f"{stem}.tiff", photo(k), fmt="TIFF")
        save(tmp_path / "src" / "mass_roads" / official / "map" / f"{stem}.tif", binary_mask(k), fmt="TIFF")
        e.add(split, stem, image, binary_mask(k), kept=False)
    out = prepare_dataset("road", tmp_path / "src", tmp_path / "data", progress=False)
    e.verify(out)


@pytest.mark.parametrize("as_folder", [False, True])
def test_trans10k_as_separate_train_validation_test_zips(tmp_path, as_folder):
    expect = build_trans10k_v1(tmp_path / "src")
    zips = tmp_path / "downloads"
    zips.mkdir()
    archives = []
    for part in ("train", "validation", "test"):  # each zip holds one split folder
        with zipfile.ZipFile(zips / f"{part}.zip", "w") as z:
            for path in sorted((tmp_path / "src" / "Trans10K" / part).rglob("*")):
                z.write(path, Path(part) / path.relative_to(tmp_path / "src" / "Trans10K" / part))
        archives.append(zips / f"{part}.zip")
    out = prepare_dataset("trans10k-v1", zips if as_folder else archives, tmp_path / "data", progress=False)
    expect.verify(out)


def test_trans10k_missing_zip_names_the_missing_part(tmp_path):
    build_trans10k_v1(tmp_path / "src")
    shutil.rmtree(tmp_path / "src" / "Trans10K" / "test")
    with pytest.raises(SamfitError, match="no test folder"):
        prepare_dataset("trans10k-v1", tmp_path / "src", tmp_path / "data", progress=False)


def build_kvasir_seg(src: Path, n: int = 10) -> dict[str, tuple[Path, np.ndarray]]:
    """The original zip: Kvasir-SEG/{images,masks}/<id>.jpg, JPEG masks, kavsir_bboxes.json."""
    items = {}
    for i in range(n):
        stem = f"cju{i:02d}qkwl35piu0993l0dewei2"
        image = save(src / "Kvasir-SEG" / "images" / f"{stem}.jpg", photo(i))
        save(src / "Kvasir-SEG" / "masks" / f"{stem}.jpg", binary_mask(i), quality=75)
        items[stem] = (image, binary_mask(i))
    (src / "Kvasir-SEG" / "kavsir_bboxes.json").write_text("{}")
    return items


def test_original_kvasir_seg_zip_gets_samfits_recorded_split(tmp_path):
    items = build_kvasir_seg(tmp_path / "src" / "kvasir-seg")
    add_junk(tmp_path / "src")
    archive = zip_folder(tmp_path / "src", tmp_path / "kvasir-seg.zip")
    out = prepare_dataset("kvasir-seg", archive, tmp_path / "data", progress=False)
    stems = sorted(items)
    order = np.random.default_rng(0).permutation(len(stems))  # the documented rule, written out again
    want = {"train": sorted(stems[i] for i in order[:8]), "val": [stems[order[8]]], "test": [stems[order[9]]]}
    assert prepared_pairs(out) == dict(sorted(want.items()))
    record = json.loads((out / "split.json").read_text())
    assert record["seed"] == 0 and record["splits"] == want
    for split, split_stems in want.items():
        for stem in split_stems:
            image, mask = items[stem]
            assert (out / split / "images" / f"{stem}.jpg").read_bytes() == image.read_bytes()
            assert np.array_equal(np.asarray(Image.open(out / split / "masks" / f"{stem}.png")), mask)  # > 127
    reports = check_dataset(out, ["background", "polyp"], "binary", splits=["train", "val", "test"])
    assert [r.images for r in reports] == [8, 1, 1] and all(r.mask_values == [0, 255] for r in reports)
    # the same zip given as polyp is refused with the way to prepare it
    with pytest.raises(SamfitError, match="samfit data prepare kvasir-seg"):
        prepare_dataset("polyp", archive, tmp_path / "data2", progress=False)


def split_into_parts(archive: Path, folder: Path, count: int = 3) -> list[Path]:
    data = archive.read_bytes()
    size = -(-len(data) // count)
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(count):
        parts.append(folder / f"{archive.name}.{i + 1:03d}")
        parts[-1].write_bytes(data[i * size:(i + 1) * size])
    return parts


def test_archive_split_into_parts_deeply_nested(tmp_path):
    expect = build_sbu(tmp_path / "src" / "a" / "b" / "c" / "d" / "e" / "f" / "g")  # the top folder 9 deep
    parts = split_into_parts(zip_folder(tmp_path / "src", tmp_path / "SBU-shadow.zip"), tmp_path / "downloads")
    out = prepare_dataset("sbu", tmp_path / "downloads", tmp_path / "data", progress=False)  # a folder of parts
    expect.verify(out)
    out = prepare_dataset("sbu", list(reversed(parts)), tmp_path / "data", progress=False)  # the parts, any order
    expect.verify(out)
    parts[1].unlink()
    with pytest.raises(SamfitError, match=r"part .*SBU-shadow.zip.002 is missing"):
        prepare_dataset("sbu", [parts[0], parts[2]], tmp_path / "data", progress=False)
