"""The pre-tiled patch demo: MedMNIST layout, determinism, class colours and ingestion."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from histodistill import config
from histodistill.data import ingest
from histodistill.data.store import SPLITS, PatchStore
from histodistill.synth.patches import PATCH_CLASSES, PatchDemoSpec, make_patch_demo
from histodistill.synth.tissue import CENTRES, unit_vector

DEFAULTS = config.defaults("demo_patches")
SPEC = PatchDemoSpec.from_config({**DEFAULTS, "n_train": 30, "n_val": 2, "n_test": 3, "seed": 5})
COUNTS = {"train": SPEC.n_train, "val": SPEC.n_val, "test": SPEC.n_test}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_patch_demo(tmp_path_factory.mktemp("patch") / "demo.npz", SPEC, progress=False)


def test_layout_is_medmnist_with_class_names(demo):
    data = np.load(demo)
    keys = {f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")}
    assert set(data.files) == keys | {"class_names"}
    assert list(data["class_names"]) == list(PATCH_CLASSES)
    for split in SPLITS:
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        n = len(PATCH_CLASSES) * COUNTS[split]
        assert images.shape == (n, 28, 28, 3) and images.dtype == np.uint8
        assert labels.shape == (n, 1) and labels.dtype == np.uint8
        assert (np.bincount(labels[:, 0], minlength=len(PATCH_CLASSES)) == COUNTS[split]).all()
    assert [p.name for p in demo.parent.iterdir()] == ["demo.npz"]  # no temporary left behind


def test_same_seed_same_arrays_other_seed_differs(tmp_path, demo):
    small = PatchDemoSpec.from_config({**DEFAULTS, "n_train": 2, "n_val": 1, "n_test": 1, "seed": 1},
                                     classes=("adipose", "tumour"))
    first = np.load(make_patch_demo(tmp_path / "a.npz", small, progress=False))
    again = np.load(make_patch_demo(tmp_path / "b.npz", small, progress=False))
    other = np.load(make_patch_demo(tmp_path / "c.npz", replace(small, seed=2), progress=False))
    for key in first.files:
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["train_images"], other["train_images"])
    np.testing.assert_array_equal(first["train_labels"], other["train_labels"])


def test_classes_differ_in_colour_as_in_h_and_e(demo):
    data = np.load(demo)
    images, labels = data["train_images"].astype(np.float64), data["train_labels"][:, 0]
    stains = np.stack([unit_vector(v) for v in CENTRES[0]["stains"]])
    conc = (-np.log(np.maximum(images, 1) / 255)).reshape(-1, 3) @ np.linalg.pinv(stains)
    conc = conc.reshape(images.shape[:3] + (2,))
    stat = {name: (images[labels == c].mean(), conc[labels == c][..., 0].mean(),
                   conc[labels == c][..., 1].mean()) for c, name in enumerate(PATCH_CLASSES)}
    bright = sorted(PATCH_CLASSES, key=lambda name: stat[name][0], reverse=True)
    assert bright[:2] == ["adipose", "mucus"]  # fat is mostly empty, mucin pale
    assert max(PATCH_CLASSES, key=lambda name: stat[name][1]) == "lymphocytes"  # most hematoxylin
    assert max(PATCH_CLASSES, key=lambda name: stat[name][2] / stat[name][1]) == "stroma"  # eosin


def test_spec_rejects_bad_sizes_and_classes():
    with pytest.raises(ValueError, match="multiple"):
        PatchDemoSpec.from_config(DEFAULTS, render=80)
    with pytest.raises(ValueError, match="unknown"):
        PatchDemoSpec.from_config(DEFAULTS, classes=("adipose", "bone"))


def test_ingest_npz_reads_the_demo(tmp_path, demo):
    data = np.load(demo)
    names = [str(n) for n in data["class_names"]]
    store = PatchStore(ingest.ingest_npz(demo, tmp_path / "p.zarr", None, {}, names))
    assert store.class_names == names and len(store) == sum(COUNTS.values()) * len(names)
    for split in SPLITS:
        idx = store.indices(split)
        np.testing.assert_array_equal(store.patches(idx).transpose(0, 2, 3, 1),
                                      data[f"{split}_images"])
        np.testing.assert_array_equal(store.array("label")[idx], data[f"{split}_labels"][:, 0])
