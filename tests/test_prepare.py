"""prepare_dataset on small fakes of every official layout (real file naming, 20x24 images), then
check_dataset on the result; error cases name the offending file."""
from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samfit.data.check import check_dataset
from samfit.data.csvpairs import read_pairs_csv
from samfit.data.layouts import decode_binary_mask, decode_trans10k_v1_mask
from samfit.data.prepare import prepare_dataset, prepared_names
from samfit.errors import SamfitError

H, W = 20, 24
TRANS10K_V2_CLASSES = 12


def photo(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def binary_mask(seed: int) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[2 + seed % 5: 14, 3 + seed % 4: 12 + seed % 7] = 255
    return m


def save(path: Path, array: np.ndarray, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt, **kw)
    return path


class Expect:
    """What the canonical folder must hold: {split: {stem: (source image, mask array, kept bytes?)}}."""

    def __init__(self):
        self.splits: dict[str, dict[str, tuple[Path, np.ndarray, bool]]] = {}

    def add(self, split: str, stem: str, image: Path, mask: np.ndarray, kept: bool = True):
        self.splits.setdefault(split, {})[stem] = (image, mask, kept)

    def verify(self, out: Path):
        assert sorted(d.name for d in out.iterdir()) == sorted(self.splits)
        for split, items in self.splits.items():
            images = {p.stem: p for p in (out / split / "images").iterdir()}
            masks = {p.stem: p for p in (out / split / "masks").iterdir()}
            assert sorted(images) == sorted(items) == sorted(masks), split
            for stem, (source, mask, kept) in items.items():
                written = Image.open(masks[stem])
                assert written.mode == "L" and masks[stem].suffix == ".png"
                assert np.array_equal(np.asarray(written), mask), (split, stem)
                if kept:
                    assert images[stem].read_bytes() == source.read_bytes()
                    assert images[stem].suffix == {".jpeg": ".jpg"}.get(source.suffix, source.suffix)
                else:
                    assert images[stem].suffix == ".png"
                    assert np.array_equal(np.asarray(Image.open(images[stem])), np.asarray(Image.open(source)))


# --- builders: one per official layout ------------------------------------------------------------------

ISIC = {"Training": "train", "Validation": "val", "Test_v2": "test"}


def build_isic(src: Path) -> Expect:
    e = Expect()
    for k, (official, split) in enumerate(ISIC.items()):
        data = src / f"ISIC-2017_{official}_Data"
        (data.parent / data.name).mkdir(parents=True, exist_ok=True)
        (data / f"ISIC-2017_{official}_Data_metadata.csv").write_text("image_id,age_approximate,sex\n")
        for i in range(2):
            stem = f"ISIC_{k * 100 + i:07d}"
            image = save(data / f"{stem}.jpg", photo(k * 10 + i))
            save(data / f"{stem}_superpixels.png", photo(99))
            save(src / f"ISIC-2017_{official}_Part1_GroundTruth" / f"{stem}_segmentation.png", binary_mask(i + k))
            e.add(split, stem, image, binary_mask(i + k))
    return e


POLYP_SETS = {"Kvasir": "kvasir", "CVC-ClinicDB": "cvc-clinicdb", "CVC-ColonDB": "cvc-colondb",
              "ETIS-LaribPolypDB": "etis", "CVC-300": "cvc-300"}


def build_polyp(src: Path) -> Expect:
    e = Expect()
    train = src / "TrainDataset"
    for i, stem in enumerate(["1", "cju0qkwl35piu0993l0dewei2"]):
        image = save(train / "images" / f"{stem}.png", photo(i))
        save(train / "masks" / f"{stem}.png", binary_mask(i))
        e.add("train", stem, image, binary_mask(i))
    test = src / "TestDataset" / "TestDataset"  # the zip nests it
    for k, (official, split) in enumerate(POLYP_SETS.items()):
        stem = f"{k + 1}"
        image = save(test / official / "images" / f"{stem}.png", photo(10 + k))
        if official == "Kvasir":  # Kvasir-SEG's own masks are JPEGs: thresholded at > 127
            save(test / official / "masks" / f"{stem}.jpg", binary_mask(k), quality=75)
        else:
            save(test / official / "masks" / f"{stem}.png", binary_mask(k))
        e.add(split, stem, image, binary_mask(k))
    return e


def build_cod(src: Path) -> Expect:
    e = Expect()
    root = src / "COD"
    for i, stem in enumerate(["COD10K-CAM-1-Aquatic-1-BatFish-2", "camourflage_00012"]):
        image = save(root / "TrainValDataset" / "Imgs" / f"{stem}.jpg", photo(i))
        save(root / "TrainValDataset" / "GT" / f"{stem}.png", binary_mask(i))
        save(root / "TrainValDataset" / "Edge" / f"{stem}.png", binary_mask(i))
        e.add("train", stem, image, binary_mask(i))
    for k, (official, stem) in enumerate([("CAMO", "camourflage_00001"), ("COD10K", "COD10K-CAM-1-Aquatic-3-Crab-32"),
                                          ("CHAMELEON", "animal-1")]):
        image = save(root / "TestDataset" / official / "Imgs" / f"{stem}.jpg", photo(20 + k))
        save(root / "TestDataset" / official / "GT" / f"{stem}.png", binary_mask(k))
        e.add(official.lower(), stem, image, binary_mask(k))
    return e


def build_sbu(src: Path) -> Expect:
    e = Expect()
    for folder, split, stems in [("SBUTrain4KRecoveredSmall", "train", ["lssd1", "lssd10"]),
                                 ("SBU-Test", "test", ["lssd1001"])]:
        for i, stem in enumerate(stems):
            image = save(src / "SBU-shadow" / folder / "ShadowImages" / f"{stem}.jpg", photo(i))
            save(src / "SBU-shadow" / folder / "ShadowMasks" / f"{stem}.png", binary_mask(i))
            e.add(split, stem, image, binary_mask(i))
    return e


def build_leaf(src: Path) -> Expect:
    e = Expect()
    for official, split in [("train", "train"), ("valid", "test")]:
        for i in range(2):
            stem = f"{i:05d}_{'0' if split == 'train' else '1'}"
            image = save(src / "orig_data" / f"{official}_images" / f"{stem}.jpg", photo(i))
            save(src / "orig_data" / f"{official}_masks" / f"{stem}.png", binary_mask(i))
            save(src / "aug_data" / f"{official}_images" / f"aug_{stem}.jpg", photo(50))  # ignored decoy
            save(src / "aug_data" / f"{official}_masks" / f"aug_{stem}.png", binary_mask(0))
            e.add(split, stem, image, binary_mask(i))
    return e


def build_road(src: Path) -> Expect:
    e = Expect()
    for k, split in enumerate(["train", "val", "test"]):
        stem = f"1007866{k}_15"
        image = save(src / "tiff" / split / f"{stem}.tiff", photo(k), fmt="TIFF")
        save(src / "tiff" / f"{split}_labels" / f"{stem}.tif", binary_mask(k), fmt="TIFF")
        e.add(split, stem, image, binary_mask(k), kept=False)
    return e


def trans10k_v1_mask(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB mask (things red, mean 85; stuff white, 255; a few off-level pixels) and its class indices."""
    rgb = np.zeros((H, W, 3), np.uint8)
    classes = np.zeros((H, W), np.uint8)
    rgb[2:8, 2:10] = (255, 0, 0)
    classes[2:8, 2:10] = 1
    rgb[10:18, 5 + seed:20] = 255
    classes[10:18, 5 + seed:20] = 2
    for (y, x), value, cls in [((0, 0), 30, 0), ((0, 1), 60, 1), ((0, 2), 200, 2)]:
        rgb[y, x] = value
        classes[y, x] = cls
    return rgb, classes


def build_trans10k_v1(src: Path) -> Expect:
    e = Expect()
    root = src / "Trans10K"
    places = [("train", "train", ""), ("validation/easy", "val", "easy_"), ("validation/hard", "val", "hard_"),
              ("test/easy", "test", "easy_"), ("test/hard", "test", "hard_")]
    for k, (folder, split, prefix) in enumerate(places):
        stem = str(k + 1)
        image = save(root / folder / "images" / f"{stem}.jpg", photo(k))
        rgb, classes = trans10k_v1_mask(k)
        save(root / folder / "masks" / f"{stem}_mask.png", rgb)
        e.add(split, prefix + stem, image, classes)
    return e


def v2_classes(seed: int) -> np.ndarray:
    m = (np.arange(H * W).reshape(H, W) + seed) % TRANS10K_V2_CLASSES
    m[0, :3] = 255
    return m.astype(np.uint8)


def save_palette(path: Path, indices: np.ndarray) -> None:
    im = Image.fromarray(indices, mode="L").convert("P")
    im.putdata(indices.ravel().tolist())
    palette = np.random.default_rng(1).integers(0, 256, 768).astype(np.uint8)  # colours != indices
    im.putpalette(palette.tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def build_trans10k_v2(src: Path) -> Expect:
    e = Expect()
    for k, (folder, split) in enumerate([("train", "train"), ("validation", "val"), ("test", "test")]):
        stem = str(k + 10)
        image = save(src / "Trans10K_cls12" / folder / "images" / f"{stem}.jpg", photo(k))
        save_palette(src / "Trans10K_cls12" / folder / "masks_12" / f"{stem}_mask.png", v2_classes(k))
        save(src / "Trans10K_cls12" / folder / "masks" / f"{stem}_mask.png", photo(0))  # v1-style: ignored
        e.add(split, stem, image, v2_classes(k))
    return e


def build_csv_zip_tree(src: Path) -> Expect:
    """The Conv-LoRA code's prepared polyp zip: polyp/polyp/{train,val,test_Kvasir,test_CVC-ClinicDB}.csv,
    written by pandas with an index column."""
    e = Expect()
    base = src / "polyp" / "polyp"
    for csv_name, split, folder in [("train", "train", "TrainDataset"), ("val", "val", "ValDataset"),
                                    ("test_Kvasir", "kvasir", "TestDataset/Kvasir"),
                                    ("test_CVC-ClinicDB", "cvc-clinicdb", "TestDataset/CVC-ClinicDB")]:
        rows = [",image,label"]
        for i in range(2):
            stem = f"{split}{i}"
            image = save(base / folder / "images" / f"{stem}.png", photo(i))
            save(base / folder / "masks" / f"{stem}.png", binary_mask(i))
            rows.append(f"{i},{folder}/images/{stem}.png,{folder}/masks/{stem}.png")
            e.add(split, stem, image, binary_mask(i))
        (base / f"{csv_name}.csv").write_text("\n".join(rows) + "\n")
    return e


BUILDERS = {
    "isic2017": (build_isic, ["background", "lesion"], "binary"),
    "polyp": (build_polyp, ["background", "polyp"], "binary"),
    "cod": (build_cod, ["background", "object"], "binary"),
    "sbu": (build_sbu, ["background", "shadow"], "binary"),
    "leaf": (build_leaf, ["background", "disease"], "binary"),
    "road": (build_road, ["background", "road"], "binary"),
    "trans10k-v1": (build_trans10k_v1, ["background", "things", "stuff"], "multiclass"),
    "trans10k-v2": (build_trans10k_v2, [f"c{i}" for i in range(TRANS10K_V2_CLASSES)], "multiclass"),
}


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(folder.rglob("*")):
            z.write(path, path.relative_to(folder))
    return archive


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_prepare_every_official_layout_from_folder(name, tmp_path):
    build, classes, task = BUILDERS[name]
    expect = build(tmp_path / "src")
    out = prepare_dataset(name, tmp_path / "src", tmp_path / "data", progress=False)
    assert out == tmp_path / "data" / name
    expect.verify(out)
    assert [p.name for p in (tmp_path / "data").iterdir()] == [name]  # the unpack folder is gone
    reports = check_dataset(out, classes, task, splits=sorted(expect.splits))
    assert {r.split: r.images for r in reports} == {s: len(v) for s, v in expect.splits.items()}
    assert all(r.min_size == r.max_size == (W, H) for r in reports)


def test_prepare_polyp_from_zip_with_progress_bar(tmp_path):
    expect = build_polyp(tmp_path / "src")
    archive = zip_folder(tmp_path / "src", tmp_path / "polyp.zip")
    out = prepare_dataset("polyp", archive, tmp_path / "data", progress=True)
    expect.verify(out)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["polyp"]


def test_prepare_isic_from_folder_of_official_zips(tmp_path):
    expect = build_isic(tmp_path / "unpacked")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    for folder in (tmp_path / "unpacked").iterdir():
        with zipfile.ZipFile(downloads / f"{folder.name}.zip", "w") as z:
            for path in folder.rglob("*"):
                z.write(path, path.relative_to(tmp_path / "unpacked"))
    out = prepare_dataset("isic2017", downloads, tmp_path / "data", progress=False)
    expect.verify(out)
    # one zip already unpacked beside the others: the unpacked part alone is incomplete, the zips complete it
    with zipfile.ZipFile(downloads / "ISIC-2017_Training_Data.zip") as z:
        z.extractall(downloads)
    out = prepare_dataset("isic2017", downloads, tmp_path / "data", progress=False)
    expect.verify(out)


def test_prepare_conv_lora_csv_zip(tmp_path):
    expect = build_csv_zip_tree(tmp_path / "src")
    archive = zip_folder(tmp_path / "src" / "polyp", tmp_path / "polyp.zip")
    out = prepare_dataset("polyp", archive, tmp_path / "data", progress=False)
    expect.verify(out)
    reports = check_dataset(out, ["background", "polyp"], "binary")
    assert [r.split for r in reports] == ["train", "val", "cvc-clinicdb", "kvasir"]


def test_rerun_skips_identical_files_and_removes_stale_ones(tmp_path):
    build_sbu(tmp_path / "src")
    out = prepare_dataset("sbu", tmp_path / "src", tmp_path / "data", progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.*")}
    stale = save(out / "train" / "images" / "old.png", photo(0))
    save(out / "old-split" / "images" / "x.png", photo(0))
    os.utime(out / "train" / "masks" / "lssd1.png", ns=(1, 1))  # same bytes: still not rewritten
    stamps[out / "train" / "masks" / "lssd1.png"] = 1
    prepare_dataset("sbu", tmp_path / "src", tmp_path / "data", progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.*")} == stamps
    assert not stale.exists() and not (out / "old-split").exists()


# --- mask decoding rules ---------------------------------------------------------------------------------

def test_binary_decoding_rules(tmp_path):
    m = binary_mask(0)
    save(tmp_path / "zero_one.png", (m // 255).astype(np.uint8))
    assert np.array_equal(decode_binary_mask(tmp_path / "zero_one.png"), m)
    red = np.zeros((H, W, 3), np.uint8)
    red[m > 0] = (200, 0, 0)
    save(tmp_path / "red.png", red)
    assert np.array_equal(decode_binary_mask(tmp_path / "red.png"), m)
    soft = np.where(m > 0, 140, 100).astype(np.uint8)
    save(tmp_path / "soft.png", soft)
    assert np.array_equal(decode_binary_mask(tmp_path / "soft.png"), m)
    save(tmp_path / "mask.jpg", m, quality=60)
    assert np.array_equal(decode_binary_mask(tmp_path / "mask.jpg"), m)
    save(tmp_path / "faint.png", np.where(m > 0, 38, 0).astype(np.uint8))  # e.g. a colour-coded class in grey
    with pytest.raises(SamfitError, match=r"faint\.png has values up to 38, none above 127"):
        decode_binary_mask(tmp_path / "faint.png")


def test_trans10k_v1_nearest_level(tmp_path):
    rgb, classes = trans10k_v1_mask(0)
    save(tmp_path / "m.png", np.dstack([rgb, np.full((H, W), 255, np.uint8)]))  # RGBA: alpha dropped
    assert np.array_equal(decode_trans10k_v1_mask(tmp_path / "m.png"), classes)


# --- errors name the file --------------------------------------------------------------------------------

def test_missing_mask_names_image(tmp_path):
    build_isic(tmp_path / "src")
    (tmp_path / "src" / "ISIC-2017_Validation_Part1_GroundTruth" / "ISIC_0000101_segmentation.png").unlink()
    with pytest.raises(SamfitError, match=r"Image without mask: .*ISIC_0000101\.jpg"):
        prepare_dataset("isic2017", tmp_path / "src", tmp_path / "data", progress=False)


def test_mask_without_image_names_mask(tmp_path):
    build_leaf(tmp_path / "src")
    (tmp_path / "src" / "orig_data" / "train_images" / "00001_0.jpg").unlink()
    with pytest.raises(SamfitError, match=r"Mask without image: .*00001_0\.png"):
        prepare_dataset("leaf", tmp_path / "src", tmp_path / "data", progress=False)


def test_corrupt_image_names_file(tmp_path):
    build_cod(tmp_path / "src")
    (tmp_path / "src" / "COD" / "TestDataset" / "CAMO" / "Imgs" / "camourflage_00001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SamfitError, match=r"camourflage_00001\.jpg"):
        prepare_dataset("cod", tmp_path / "src", tmp_path / "data", progress=False)


def test_size_mismatch_names_both(tmp_path):
    build_sbu(tmp_path / "src")
    save(tmp_path / "src" / "SBU-shadow" / "SBU-Test" / "ShadowMasks" / "lssd1001.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(SamfitError, match=r"lssd1001\.png is 10x10 but its image .*lssd1001\.jpg is 24x20"):
        prepare_dataset("sbu", tmp_path / "src", tmp_path / "data", progress=False)


def test_trans10k_v2_illegal_index_and_rgb_mask(tmp_path):
    build_trans10k_v2(tmp_path / "src")
    bad = v2_classes(0)
    bad[5, 5] = 20
    mask = tmp_path / "src" / "Trans10K_cls12" / "test" / "masks_12" / "12_mask.png"
    save_palette(mask, bad)
    with pytest.raises(SamfitError, match=r"12_mask\.png holds class indices \[20\]"):
        prepare_dataset("trans10k-v2", tmp_path / "src", tmp_path / "data", progress=False)
    save(mask, photo(0))
    with pytest.raises(SamfitError, match=r"12_mask\.png has mode RGB"):
        prepare_dataset("trans10k-v2", tmp_path / "src", tmp_path / "data", progress=False)


def test_partial_isic_download_lists_missing_parts(tmp_path):
    build_isic(tmp_path / "src")
    shutil.rmtree(tmp_path / "src" / "ISIC-2017_Test_v2_Part1_GroundTruth")
    with pytest.raises(SamfitError, match="ISIC-2017_Test_v2_Part1_GroundTruth"):
        prepare_dataset("isic2017", tmp_path / "src", tmp_path / "data", progress=False)


def test_missing_polyp_test_set_prepares_the_others(tmp_path):
    expect = build_polyp(tmp_path / "src")
    shutil.rmtree(tmp_path / "src" / "TestDataset" / "TestDataset" / "ETIS-LaribPolypDB")
    del expect.splits["etis"]
    expect.verify(prepare_dataset("polyp", tmp_path / "src", tmp_path / "data", progress=False))


def test_unknown_layout_shows_expected_one(tmp_path):
    save(tmp_path / "src" / "pictures" / "a.png", photo(0))
    with pytest.raises(SamfitError) as e:
        prepare_dataset("polyp", tmp_path / "src", tmp_path / "data", progress=False)
    assert "TrainDataset/{images,masks}" in str(e.value) and "train.csv" in str(e.value)


def test_unknown_name_suggests_closest(tmp_path):
    with pytest.raises(SamfitError, match="Did you mean 'polyp'"):
        prepare_dataset("polyps", tmp_path, tmp_path / "data", progress=False)
    assert "isic2017" in prepared_names()


def test_bad_sources(tmp_path):
    with pytest.raises(SamfitError, match="does not exist"):
        prepare_dataset("sbu", tmp_path / "nope", tmp_path / "data", progress=False)
    build_sbu(tmp_path / "data" / "sbu" / "raw")
    with pytest.raises(SamfitError, match="inside the output folder"):
        prepare_dataset("sbu", tmp_path / "data" / "sbu" / "raw", tmp_path / "data", progress=False)
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as z:
        z.writestr("../outside.txt", "x")
    with pytest.raises(SamfitError, match="outside its folder"):
        prepare_dataset("sbu", tmp_path / "evil.zip", tmp_path / "data", progress=False)
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(SamfitError, match=r"Cannot unpack .*broken\.zip"):
        prepare_dataset("sbu", tmp_path / "broken.zip", tmp_path / "data", progress=False)


def test_error_inside_zip_names_the_archive(tmp_path):
    build_sbu(tmp_path / "src")
    (tmp_path / "src" / "SBU-shadow" / "SBU-Test" / "ShadowMasks" / "lssd1001.png").unlink()
    archive = zip_folder(tmp_path / "src", tmp_path / "SBU-shadow.zip")
    with pytest.raises(SamfitError) as e:
        prepare_dataset("sbu", archive, tmp_path / "data", progress=False)
    assert f"{archive}:" in str(e.value) and "lssd1001.jpg" in str(e.value) and ".unpack" not in str(e.value)


# --- CSV pair lists ---------------------------------------------------------------------------------------

def _csv_dataset(tmp_path: Path, rows: list[str], header: str = "image,label") -> Path:
    save(tmp_path / "d" / "images" / "a.png", photo(0))
    save(tmp_path / "d" / "masks" / "a.png", binary_mask(0))
    csv = tmp_path / "d" / "train.csv"
    csv.write_text("\n".join([header, *rows]) + "\n")
    return csv


def test_read_pairs_csv(tmp_path):
    csv = _csv_dataset(tmp_path, ["images/a.png,masks/a.png", "images/a.png,masks/a.png", ""])
    assert read_pairs_csv(csv) == [(tmp_path / "d" / "images" / "a.png", tmp_path / "d" / "masks" / "a.png")]


@pytest.mark.parametrize("row, message", [
    ("../d/images/a.png,masks/a.png", r"line 3, column 'image': '\.\./d/images/a\.png' leaves the CSV's folder"),
    ("images/../../x.png,masks/a.png", r"line 3, column 'image'.*leaves the CSV's folder"),
    ("/etc/passwd,masks/a.png", r"line 3, column 'image': '/etc/passwd' is an absolute path"),
    ("images/a.png,masks/b.png", r"line 3, column 'label': file 'masks/b\.png' not found"),
    ("images/a.png,", r"line 3, column 'label': the cell is empty"),
])
def test_read_pairs_csv_refuses(tmp_path, row, message):
    csv = _csv_dataset(tmp_path, ["images/a.png,masks/a.png", row])
    with pytest.raises(SamfitError, match=message) as e:
        read_pairs_csv(csv)
    assert str(csv) in str(e.value)


def test_read_pairs_csv_missing_column(tmp_path):
    csv = _csv_dataset(tmp_path, ["images/a.png,masks/a.png"], header="image,mask")
    with pytest.raises(SamfitError, match=r"train\.csv: no column 'label'"):
        read_pairs_csv(csv)


def test_prepare_refuses_csv_escaping_its_folder(tmp_path):
    build_csv_zip_tree(tmp_path / "src")
    csv = tmp_path / "src" / "polyp" / "polyp" / "val.csv"
    csv.write_text(",image,label\n0,../../../secret.png,ValDataset/masks/val0.png\n")
    with pytest.raises(SamfitError, match=r"val\.csv, line 2, column 'image'.*leaves the CSV's folder"):
        prepare_dataset("polyp", tmp_path / "src", tmp_path / "data", progress=False)
