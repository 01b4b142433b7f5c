"""Ingest datasets that are already tiled into the patch-store layout.

Formats: ``imagefolder`` (``root/[split/]class/*.png``), ``npz`` (MedMNIST keys
``train_images``, ``train_labels``, ``val_*``, ``test_*``; e.g. PathMNIST) and ``csv`` (a label
CSV per split naming image files, e.g. UniToPath). Patches are resized to ``patch_size`` when
given; coordinates and slides are -1 (unknown).
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from histodistill.cohort import resolve_root
from histodistill.data.stream import record_channel_stats
from histodistill.io import InputError
from histodistill.store import SPLITS, StoreWriter

STAGE = "ingest"
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def _load(path: Path, size: int | None, crop: int | None = None) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if crop:
                w, h = im.size
                if crop > min(w, h):
                    raise InputError(STAGE, path, f"center_crop={crop} exceeds the image ({w}x{h})")
                left, top = (w - crop) // 2, (h - crop) // 2
                im = im.crop((left, top, left + crop, top + crop))
            if size and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im)
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(STAGE, path, f"image cannot be read ({err})") from err


def imagefolder_items(root: Path, split_fraction: float, seed: int
                      ) -> tuple[list[tuple[Path, str, str]], list[str]]:
    """(path, class, split) for an ImageFolder tree, with or without split folders.

    Without split folders, ``split_fraction`` of each class (seeded) becomes the test split.
    """
    split_dirs = [d for d in SPLITS if (root / d).is_dir()]
    items: list[tuple[Path, str, str]] = []
    for split in split_dirs or [""]:
        base = root / split if split else root
        for cls_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            for path in sorted(cls_dir.rglob("*")):
                if path.suffix.lower() in IMAGE_EXTS:
                    items.append((path, cls_dir.name, split))
    if not items:
        raise InputError(STAGE, root, "no images found (expected root/[split/]class/*.png)")
    classes = sorted({c for _, c, _ in items})
    if not split_dirs:
        rng = np.random.default_rng(seed)
        out = []
        for cls in classes:
            members = [it for it in items if it[1] == cls]
            test = set(rng.permutation(len(members))[: int(round(split_fraction * len(members)))].tolist())
            out += [(p, c, "test" if k in test else "train") for k, (p, c, _) in enumerate(members)]
        items = out
    return items, classes


def csv_items(root: Path, dataset: dict[str, Any]) -> tuple[list[tuple[Path, str, str]], list[str]]:
    """(path, class, split) from one label CSV per split (``csv: {train: ..., test: ...}``)."""
    image_col = dataset.get("image_column", "image")
    label_col = dataset.get("label_column", "label")
    image_dir = dataset.get("image_dir", "{split}")
    items = []
    for split, rel in dataset["csv"].items():
        path = Path(str(rel).format(root=root))
        if not path.is_file():
            raise InputError(STAGE, path, f"label CSV for split {split!r} does not exist")
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {image_col, label_col} - set(reader.fieldnames or [])
            if missing:
                raise InputError(STAGE, path, f"missing column(s) {sorted(missing)}")
            for rec in reader:
                label = rec[label_col].strip()
                folder = root / image_dir.format(split=split, label=label)
                items.append((folder / rec[image_col].strip(), label, split))
    return items, sorted({c for _, c, _ in items})


def ingest_images(items: list[tuple[Path, str, str]], classes: list[str], out: Path,
                  patch_size: int | None, attrs: dict[str, Any], batch: int = 512,
                  crop: int | None = None) -> Path:
    """Write (path, class, split) items into a new patch store at ``out`` (atomically),
    optionally keeping the central ``crop`` pixels before resizing to ``patch_size``."""
    if patch_size is None:
        patch_size = _load(items[0][0], None, crop).shape[0]
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    writer = StoreWriter(partial, patch_size, attrs=_meta(classes, patch_size, attrs))
    for s in range(0, len(items), batch):
        chunk = items[s:s + batch]
        imgs = np.stack([_load(p, patch_size, crop) for p, _, _ in chunk])
        n = len(chunk)
        writer.append(imgs, np.full((n, 2), -1), np.full(n, -1),
                      np.array([classes.index(c) for _, c, _ in chunk]),
                      np.array([SPLITS.index(sp) for _, _, sp in chunk]))
    return _finish(partial, out)


def ingest_npz(path: Path, out: Path, patch_size: int | None, attrs: dict[str, Any],
               class_names: list[str] | None = None) -> Path:
    """Write a MedMNIST-style ``.npz`` into a new patch store at ``out`` (atomically)."""
    if not path.is_file():
        raise InputError(STAGE, path, "npz file does not exist")
    try:
        data = np.load(path)
        splits = [s for s in SPLITS if f"{s}_images" in data.files]
    except (OSError, ValueError) as err:
        raise InputError(STAGE, path, f"npz cannot be read ({err})") from err
    if not splits:
        raise InputError(STAGE, path, "no '<split>_images' arrays (expected MedMNIST keys)")
    labels = {s: np.asarray(data[f"{s}_labels"]).reshape(-1).astype(np.int64) for s in splits}
    n_classes = int(max(v.max() for v in labels.values())) + 1
    stored = [str(c) for c in data["class_names"]] if "class_names" in data.files else None
    classes = class_names or stored or [str(i) for i in range(n_classes)]
    size = patch_size or int(data[f"{splits[0]}_images"].shape[1])
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    writer = StoreWriter(partial, size, attrs=_meta(classes, size, attrs))
    for split in splits:
        imgs = np.asarray(data[f"{split}_images"])
        if imgs.ndim == 3:  # grayscale MedMNIST sets
            imgs = np.repeat(imgs[..., None], 3, -1)
        if imgs.shape[1] != size:
            imgs = np.stack([np.asarray(Image.fromarray(i).resize((size, size), Image.Resampling.BILINEAR))
                             for i in imgs])
        n = len(imgs)
        writer.append(imgs.astype(np.uint8), np.full((n, 2), -1), np.full(n, -1), labels[split],
                      np.full(n, SPLITS.index(split)))
    return _finish(partial, out)


def _meta(classes: list[str], patch_size: int, attrs: dict[str, Any]) -> dict[str, Any]:
    return {"class_names": classes, "split_names": list(SPLITS), "slides": [],
            "patch_size": patch_size, **attrs}


def _finish(partial: Path, out: Path) -> Path:
    record_channel_stats(partial)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    return out


def ingest_dataset(name: str, dataset: dict[str, Any], out: str | os.PathLike,
                   attrs: dict[str, Any] | None = None) -> Path:
    """Ingest a pre-tiled dataset described by its config entry into ``out``."""
    root = resolve_root(name, dataset)
    out = Path(out)
    size = dataset.get("patch_size")
    attrs = {"source": dataset["format"], "dataset": name, **(attrs or {})}
    fmt = dataset["format"]
    if fmt == "npz":
        return ingest_npz(Path(str(dataset.get("file", "{root}")).format(root=root)), out, size,
                          attrs, dataset.get("classes"))
    if fmt == "imagefolder":
        items, classes = imagefolder_items(root, float(dataset.get("test_fraction", 0.2)),
                                           int(dataset.get("seed", 0)))
    else:
        items, classes = csv_items(root, dataset)
    return ingest_images(items, dataset.get("classes") or classes, out, size, attrs,
                         crop=dataset.get("center_crop"))
