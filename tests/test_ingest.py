"""Pre-tiled datasets round-trip into the patch store."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import DATASET
from histodistill.data import ingest
from histodistill.io import InputError
from histodistill.data.store import SPLITS, PatchStore


def images(seed: int, n: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_tree(root, layout: dict[str, dict[str, np.ndarray]]) -> None:
    for split, classes in layout.items():
        for cls, imgs in classes.items():
            folder = root / split / cls if split else root / cls
            folder.mkdir(parents=True)
            for i, img in enumerate(imgs):
                Image.fromarray(img).save(folder / f"{i:03d}.png")


def test_imagefolder_with_split_folders_round_trips(tmp_path):
    layout = {"train": {"adi": images(0, 3), "tum": images(1, 2)}, "test": {"adi": images(2, 1), "tum": images(3, 2)}}
    write_tree(tmp_path / "data", layout)
    store = PatchStore(ingest.ingest_dataset("folder", {**DATASET, "format": "imagefolder",
                                                        "root": str(tmp_path / "data")},
                                             tmp_path / "p.zarr"))
    assert store.class_names == ["adi", "tum"] and len(store) == 8
    got = store.patches().transpose(0, 2, 3, 1)
    label, split = store.array("label"), store.array("split")
    expected = [(img, cls, sp) for sp, classes in layout.items() for cls, imgs in classes.items() for img in imgs]
    # items are read per split in SPLITS order, classes sorted, files sorted
    expected.sort(key=lambda t: (SPLITS.index(t[2]), t[1]))
    for k, (img, cls, sp) in enumerate(expected):
        np.testing.assert_array_equal(got[k], img)
        assert store.class_names[label[k]] == cls and SPLITS[split[k]] == sp
    assert (store.array("coords") == -1).all()


def test_imagefolder_without_splits_is_split_per_class(tmp_path):
    write_tree(tmp_path / "data", {"": {"a": images(0, 8), "b": images(1, 4)}})
    cfg = {**DATASET, "format": "imagefolder", "root": str(tmp_path / "data"), "test_fraction": 0.25, "seed": 1}
    store = PatchStore(ingest.ingest_dataset("f", cfg, tmp_path / "p.zarr"))
    label, split = store.array("label"), store.array("split")
    assert (split[label == 0] == 2).sum() == 2 and (split[label == 1] == 2).sum() == 1


def test_npz_round_trips(tmp_path):
    data = {"train_images": images(0, 6, 28), "train_labels": np.array([[0], [1], [2], [0], [1], [2]]),
            "val_images": images(1, 2, 28), "val_labels": np.array([[2], [0]]),
            "test_images": images(2, 3, 28), "test_labels": np.array([[1], [1], [0]])}
    np.savez(tmp_path / "pathmnist.npz", **data)
    cfg = {**DATASET, "format": "npz", "root": str(tmp_path), "file": "{root}/pathmnist.npz",
           "classes": ["x", "y", "z"]}
    store = PatchStore(ingest.ingest_dataset("pm", cfg, tmp_path / "p.zarr"))
    assert len(store) == 11 and store.class_names == ["x", "y", "z"]
    np.testing.assert_array_equal(store.patches(store.indices("val")).transpose(0, 2, 3, 1), data["val_images"])
    np.testing.assert_array_equal(store.array("label")[store.indices("test")], [1, 1, 0])


def test_grayscale_npz_becomes_rgb_and_resizes(tmp_path):
    np.savez(tmp_path / "g.npz", train_images=images(0, 2, 28)[..., 0], train_labels=np.array([0, 1]))
    cfg = {**DATASET, "format": "npz", "root": str(tmp_path), "file": "{root}/g.npz", "patch_size": 32}
    store = PatchStore(ingest.ingest_dataset("g", cfg, tmp_path / "p.zarr"))
    p = store.patches()
    assert p.shape == (2, 3, 32, 32) and (p[:, 0] == p[:, 1]).all()


def test_label_csv_format(tmp_path):
    root = tmp_path / "unito"
    for split, rows in {"train": [("a.png", "HP"), ("b.png", "NORM")], "test": [("c.png", "HP")]}.items():
        lines = ["image_id,top_label_name"]
        for name, label in rows:
            (root / "800" / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(images(ord(name[0]), 1, 20)[0]).save(root / "800" / label / name)
            lines.append(f"{name},{label}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    cfg = {**DATASET, "format": "csv", "root": str(root),
           "csv": {"train": "{root}/train.csv", "test": "{root}/test.csv"},
           "image_column": "image_id", "label_column": "top_label_name", "image_dir": "800/{label}", "patch_size": 16}
    store = PatchStore(ingest.ingest_dataset("u", cfg, tmp_path / "p.zarr"))
    assert store.class_names == ["HP", "NORM"] and list(store.array("split")) == [0, 0, 2]


def test_bad_inputs_name_the_file(tmp_path):
    (tmp_path / "d" / "cls").mkdir(parents=True)
    (tmp_path / "d" / "cls" / "x.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"\[ingest\] .*x.png: image cannot be read"):
        ingest.ingest_dataset("d", {**DATASET, "format": "imagefolder", "root": str(tmp_path / "d")},
                              tmp_path / "p.zarr")
    assert not (tmp_path / "p.zarr").exists()
    np.savez(tmp_path / "bad.npz", images=np.zeros(3))
    with pytest.raises(InputError, match="bad.npz: no '<split>_images' arrays"):
        ingest.ingest_dataset("b", {**DATASET, "format": "npz", "root": str(tmp_path), "file": "{root}/bad.npz"},
                              tmp_path / "q.zarr")
    with pytest.raises(InputError, match=r"datasets.pathmnist.root: is not set"):
        ingest.ingest_dataset("pathmnist", {**DATASET, "format": "npz", "root": None}, tmp_path / "r.zarr")


def test_center_crop_keeps_the_middle_before_resizing(tmp_path):
    img = images(5, 1, size=12)[0]
    write_tree(tmp_path / "data", {"train": {"a": [img], "b": [img]}})
    cfg = {**DATASET, "format": "imagefolder", "root": str(tmp_path / "data"), "center_crop": 4}
    store = PatchStore(ingest.ingest_dataset("crop", cfg, tmp_path / "p.zarr"))
    np.testing.assert_array_equal(store.patches()[0].transpose(1, 2, 0), img[4:8, 4:8])
    with pytest.raises(InputError, match="center_crop=20 exceeds the image"):
        ingest.ingest_dataset("crop", {**cfg, "center_crop": 20}, tmp_path / "q.zarr")


def test_store_records_training_channel_statistics(tmp_path):
    train, test = images(0, 6), images(1, 3)
    np.savez(tmp_path / "d.npz", train_images=train, train_labels=np.array([0, 1] * 3),
             test_images=test, test_labels=np.array([0, 1, 0]),
             class_names=np.array(["adipose", "tumour"]))
    store = PatchStore(ingest.ingest_npz(tmp_path / "d.npz", tmp_path / "p.zarr", None, {}))
    assert store.class_names == ["adipose", "tumour"]  # names stored in the npz
    pixels = train.astype(np.float64) / 255
    np.testing.assert_allclose(store.attrs["channel_mean"], pixels.mean((0, 1, 2)), atol=1e-9)
    np.testing.assert_allclose(store.attrs["channel_std"], pixels.std((0, 1, 2)), atol=1e-9)
