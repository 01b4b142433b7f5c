"""One policy for pre-tiled images (README: "Bad input"): modes converted as stated, never
clipped or squashed silently; paths confined to the root; duplicates and near-miss labels
refused by name."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import DATASET
from histodistill.data import ingest
from histodistill.data.store import PatchStore
from histodistill.io import InputError


def noise(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def folder_set(root: Path, extra: dict[str, Image.Image] | None = None, size: int = 16) -> Path:
    """train/{a,b} and test/{a,b} with distinct noise PNGs, plus ``extra`` files (relative name
    -> image) written as given."""
    for k, rel in enumerate(["train/a/0.png", "train/a/1.png", "train/b/2.png", "test/a/3.png",
                             "test/b/4.png"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise(k, size)).save(root / rel)
    for rel, im in (extra or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        im.save(root / rel)
    return root


def ingest_folder(root: Path, out: Path, **extra) -> PatchStore:
    return PatchStore(ingest.ingest_dataset("d", {**DATASET, "format": "imagefolder", "root": str(root),
                                                  **extra}, out))


def patch_of(store: PatchStore, split: str, k: int = -1) -> np.ndarray:
    rows = store.indices(split)
    return store.patches(rows[k:] if k == -1 else rows[k:k + 1])[0].transpose(1, 2, 0)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.tile(np.array([0, 1000, 32768, 65535], np.uint16), (16, 4))
    im = Image.fromarray(values.astype(np.uint16))
    assert im.mode.startswith("I;16")
    store = ingest_folder(folder_set(tmp_path / "d", {"train/b/z.png": im}), tmp_path / "p.zarr")
    got = store.patches(store.indices("train"))[-1][0]  # the last training row, channel 0
    assert got[0, :4].tolist() == [0, 4, 128, 255]  # clipping would give 0, 255, 255, 255


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :8, 3] = 0      # fully transparent: white glass
    rgba[:, 8:, 3] = 255    # opaque: its own colour
    store = ingest_folder(folder_set(tmp_path / "d", {"train/b/z.png": Image.fromarray(rgba)}),
                          tmp_path / "p.zarr")
    got = store.patches(store.indices("train"))[-1].transpose(1, 2, 0)
    assert (got[:, :8] == 255).all() and (got[:, 8:] == [200, 0, 0]).all()


def test_grayscale_and_palette_are_expanded(tmp_path, caplog):
    gray = Image.fromarray(np.full((16, 16), 77, np.uint8))
    with caplog.at_level(logging.INFO, logger="histodistill.data.ingest"):
        store = ingest_folder(folder_set(tmp_path / "d", {"train/b/z.png": gray}), tmp_path / "p.zarr")
    assert (store.patches(store.indices("train"))[-1] == 77).all()
    assert any("1 of 6 images: L (grayscale, expanded to RGB)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name, image, message", [
    ("f.tiff", Image.fromarray(np.ones((16, 16), np.float32)), "pixel mode 'F' is not supported"),
    ("tiny.png", Image.fromarray(noise(9, 4)), r"is 4x4 px, smaller than 8 px"),
    ("wide.png", Image.fromarray(np.zeros((16, 24, 3), np.uint8)), "is 24x16 px, not square"),
])
def test_unsupported_images_are_refused_by_name(tmp_path, name, image, message):
    root = folder_set(tmp_path / "d", {f"train/b/{name}": image})
    with pytest.raises(InputError, match=rf"\[ingest\] .*{name}: {message}"):
        ingest_folder(root, tmp_path / "p.zarr")
    assert not (tmp_path / "p.zarr").exists()


def test_a_multi_frame_file_is_refused(tmp_path):
    root = folder_set(tmp_path / "d")
    frames = [Image.fromarray(noise(20 + k)) for k in range(3)]
    frames[0].save(root / "train/b/stack.tif", save_all=True, append_images=frames[1:])
    with pytest.raises(InputError, match=r"stack.tif: holds 3 frames"):
        ingest_folder(root, tmp_path / "p.zarr")


def test_mixed_sizes_need_an_explicit_patch_size_and_are_then_resized_and_counted(tmp_path, caplog):
    root = folder_set(tmp_path / "d", {"train/b/big.png": Image.fromarray(noise(30, 32))})
    with pytest.raises(InputError, match=r"big.png: is 32 px but .*0.png is 16 px: images of "
                                         r"mixed sizes; set datasets.<name>.patch_size"):
        ingest_folder(root, tmp_path / "p.zarr")
    with caplog.at_level(logging.INFO, logger="histodistill.data.ingest"):
        store = ingest_folder(root, tmp_path / "q.zarr", patch_size=16)
    assert store.patches().shape[-1] == 16 and len(store) == 6
    assert any("1 of 6 images: 32 px, resized to 16 px" in r.getMessage() for r in caplog.records)


def test_a_folder_nested_in_a_class_folder_is_an_error_not_that_class(tmp_path):
    root = folder_set(tmp_path / "d", {"train/a/old_rejects/r.png": Image.fromarray(noise(40))})
    with pytest.raises(InputError, match=r"old_rejects: a folder inside class folder 'a'"):
        ingest_folder(root, tmp_path / "p.zarr")


@pytest.mark.parametrize("where, message", [
    ("train/c/", r"train/c: class folder holds no images"),
    ("train/loose.png", r"d/train: 1 image file\(s\) outside any class folder \(loose.png\)"),
    ("loose.png", r"d: 1 image file\(s\) outside any class folder \(loose.png\)"),
])
def test_an_empty_class_folder_or_an_image_outside_the_class_folders_is_an_error(tmp_path, where,
                                                                                 message):
    """Either used to vanish: the empty class from the classes, the loose image from the set."""
    root = folder_set(tmp_path / "d")
    if where.endswith("/"):
        (root / where).mkdir()
    else:
        Image.fromarray(noise(7)).save(root / where)
    (root / "README.md").write_text("a dataset's notes beside its folders are fine")
    with pytest.raises(InputError, match=r"^\[ingest\] .*" + message):
        ingest_folder(root, tmp_path / "p.zarr")
    assert not (tmp_path / "p.zarr").exists()


def test_non_image_files_are_refused_and_browser_files_skipped(tmp_path):
    root = folder_set(tmp_path / "d")
    (root / "train/a/.DS_Store").write_bytes(b"\0")
    (root / "train/a/Thumbs.db").write_bytes(b"\0")
    assert len(ingest_folder(root, tmp_path / "p.zarr")) == 5
    (root / "train/a/notes.txt").write_text("scanner settings")
    with pytest.raises(InputError, match=r"notes.txt: not an image file"):
        ingest_folder(root, tmp_path / "q.zarr")


def test_the_same_pixels_in_two_splits_are_an_error_or_dropped_with_dedupe(tmp_path, caplog):
    root = folder_set(tmp_path / "d")
    Image.fromarray(noise(0)).save(root / "test/a/copy_of_0.png")  # train/a/0.png again
    with pytest.raises(InputError, match=r"copy_of_0.png: holds the same pixels as .*0.png "
                                         r"\(train split\)"):
        ingest_folder(root, tmp_path / "p.zarr")
    with caplog.at_level(logging.INFO, logger="histodistill.data.ingest"):
        store = ingest_folder(root, tmp_path / "q.zarr", dedupe=True)
    assert len(store) == 5 and len(store.indices("test")) == 2
    assert any("dedupe: dropped 1 patches" in r.getMessage() for r in caplog.records)
    # within one split, a repeat is kept and counted (PCam holds some)
    Image.fromarray(noise(0)).save(root / "train/a/again.png")
    (root / "test/a/copy_of_0.png").unlink()
    with caplog.at_level(logging.INFO, logger="histodistill.data.ingest"):
        assert len(ingest_folder(root, tmp_path / "r.zarr")) == 6
    assert any("1 patches repeat the pixels" in r.getMessage() for r in caplog.records)


def test_a_class_folder_differing_in_case_names_the_class(tmp_path):
    root = folder_set(tmp_path / "d")
    (root / "train/a").rename(root / "train/A")
    (root / "test/a").rename(root / "test/A")
    with pytest.raises(InputError, match=r"class 'A' is not among the configured classes "
                                         r"\['a', 'b'\].*\(did you mean 'a'\?\)"):
        ingest_folder(root, tmp_path / "p.zarr", classes=["a", "b"])


def csv_set(root: Path, rows: dict[str, list[tuple[str, str]]]) -> dict:
    for k, name in enumerate(["x.png", "y.png", "z.png", "w.png"]):
        (root / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise(50 + k)).save(root / "img" / name)
    for split, lines in rows.items():
        (root / f"{split}.csv").write_text("image,label\n" + "".join(f"{i},{label}\n" for i, label in lines))
    return {**DATASET, "format": "csv", "root": str(root), "image_dir": "img",
            "csv": {s: f"{{root}}/{s}.csv" for s in rows}}


@pytest.mark.parametrize("train, test, message", [
    ([("x.png", "a"), ("y.png", "b"), ("../../outside/secret.png", "a")], [("z.png", "a")],
     r"train.csv, line 4: image .*secret.png. resolves to .*outside the dataset root"),
    ([("x.png", "a"), ("y.png", "b"), ("/etc/hostname", "a")], [("z.png", "a")],
     r"line 4: image '/etc/hostname' resolves to .*outside the dataset root"),
    ([("x.png", "a"), ("y.png", "b")], [("x.png", "a")],
     r"test.csv, line 2: image 'x.png' is listed again \(first at .*train.csv, line 2\)"),
    ([("x.png", "a"), ("y.png", "b"), ("y.png", "b")], [("z.png", "a")],
     r"train.csv, line 4: image 'y.png' is listed again \(first at .*train.csv, line 3\)"),
    ([("x.png", "a"), ("y.png", "b"), ("w.png", "A")], [("z.png", "a")],
     r"line 4: label 'A' differs from 'a' only in case or spaces"),
    ([("x.png", "a"), ("y.png", "b "), ("w.png", "b")], [("z.png", "a")],
     r"line 3: label 'b ' differs from its stripped form only in case or spaces"),
])
def test_csv_rows_stay_inside_the_root_once_each_with_exact_labels(tmp_path, train, test, message):
    cfg = csv_set(tmp_path / "d", {"train": train, "test": test})
    (tmp_path / "outside").mkdir()
    Image.fromarray(noise(99)).save(tmp_path / "outside" / "secret.png")
    with pytest.raises(InputError, match=r"\[ingest\] .*" + message):
        ingest.ingest_dataset("c", cfg, tmp_path / "p.zarr")
    assert not (tmp_path / "p.zarr").exists()


@pytest.mark.parametrize("text, message", [
    ("image,label\nx.png,a\ny.png,\n", r"train.csv, line 3: empty \['label'\] cell"),
    ("image,label\nx.png,a\ny.png\n", r"train.csv, line 3: has 1 fields, the header 2 \(no \['label'\]\)"),
    ("image,label\nx.png,a\ny.png,b,a\n", r"train.csv, line 3: has 3 fields, the header 2"),
    ("image,label,label\nx.png,a,b\n", r"train.csv: column\(s\) \['label'\] appear more than once"),
    ("image;label\nx.png;a\n", r"train.csv: missing column\(s\) \['image', 'label'\]"),
    ("image,label\nx.png,a\n\xe9.png,b\n", r"train.csv: is not UTF-8 text"),
])
def test_a_malformed_label_csv_is_one_error_naming_its_line(tmp_path, text, message):
    cfg = csv_set(tmp_path / "d", {"train": [("x.png", "a")], "test": [("z.png", "a")]})
    data = text.encode("latin-1") if "\xe9" in text else text.encode()
    (tmp_path / "d" / "train.csv").write_bytes(data)
    with pytest.raises(InputError, match=r"^\[ingest\] .*" + message):
        ingest.ingest_dataset("c", cfg, tmp_path / "p.zarr")
    assert not (tmp_path / "p.zarr").exists()


def test_a_label_csv_with_a_byte_order_mark_reads_as_without(tmp_path):
    cfg = csv_set(tmp_path / "d", {"train": [("x.png", "a"), ("y.png", "b")], "test": [("z.png", "a")]})
    (tmp_path / "d" / "train.csv").write_bytes(b"\xef\xbb\xbfimage,label\nx.png,a\ny.png,b\n")
    assert PatchStore(ingest.ingest_dataset("c", cfg, tmp_path / "p.zarr")).class_names == ["a", "b"]


def test_a_clean_csv_set_is_ingested(tmp_path):
    cfg = csv_set(tmp_path / "d", {"train": [("x.png", "a"), ("y.png", "b")], "test": [("z.png", "a")]})
    store = PatchStore(ingest.ingest_dataset("c", cfg, tmp_path / "p.zarr"))
    assert store.class_names == ["a", "b"] and list(store.array("split")) == [0, 0, 2]
