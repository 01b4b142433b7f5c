"""Ingest datasets that are already tiled into the patch-store layout.

Formats: ``imagefolder`` (``root/[split/]class/*.png``), ``npz`` (MedMNIST keys
``train_images``, ``train_labels``, ``val_*``, ``test_*``; e.g. PathMNIST) and ``csv`` (a label
CSV per split naming image files, e.g. UniToPath). Patches are resized to ``patch_size`` when
given; coordinates and slides are -1 (unknown).
"""

from __future__ import annotations

import csv
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from histodistill.slides.cohort import resolve_root
from histodistill.data.stream import record_channel_stats
from histodistill.io import InputError, atomic_path
from histodistill.data.store import SPLITS, StoreWriter

STAGE = "ingest"
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}  # matched ignoring case


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

    Split folders are recognised by the names in :data:`SPLIT_FOLDERS`, ignoring case
    (``Train/``, ``valid/``, ``Testing/``); a root that mixes them with class folders, or holds
    two spellings of one split, is an error. Without split folders, ``split_fraction`` of each
    class (seeded) becomes the test split.
    """
    split_dirs = _split_folders(root)
    items: list[tuple[Path, str, str]] = []
    for split, base in split_dirs.items() or [("", root)]:
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


def _split_folders(root: Path) -> dict[str, Path]:
    """The split folders directly under ``root``, keyed by split (empty when there are none)."""
    dirs = sorted(p for p in root.iterdir() if p.is_dir())
    splits = {d: SPLIT_FOLDERS[d.name.lower()] for d in dirs if d.name.lower() in SPLIT_FOLDERS}
    if not splits:
        return {}
    others = [d.name for d in dirs if d not in splits]
    if others:
        raise InputError(STAGE, root, f"mixes split folders {sorted(d.name for d in splits)} with "
                         f"other folders {others}; use root/split/class/ or root/class/")
    out: dict[str, Path] = {}
    for d, split in splits.items():
        if split in out:
            raise InputError(STAGE, root, f"folders {out[split].name!r} and {d.name!r} are both "
                             f"the {split} split")
        out[split] = d
    return {split: out[split] for split in SPLITS if split in out}  # read in SPLITS order


def csv_items(root: Path, dataset: dict[str, Any]) -> tuple[list[tuple[Path, str, str]], list[str]]:
    """(path, class, split) from one label CSV per split (``csv: {train: ..., test: ...}``)."""
    image_col = dataset.get("image_column", "image")
    label_col = dataset.get("label_column", "label")
    image_dir = dataset.get("image_dir", "{split}")
    items = []
    for split, rel in dataset["csv"].items():
        path = Path(str(rel).format(root=root))
        if split not in SPLITS:
            raise InputError(STAGE, path, f"csv key {split!r} is not a split; use {list(SPLITS)}")
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
    if not items:
        raise InputError(STAGE, root,
                         f"the label CSVs {sorted(dataset['csv'].values())} list no images")
    return items, sorted({c for _, c, _ in items})


def ingest_images(items: list[tuple[Path, str, str]], classes: list[str], out: Path,
                  patch_size: int | None, attrs: dict[str, Any], batch: int = 512,
                  crop: int | None = None) -> Path:
    """Write (path, class, split) items into a new patch store at ``out`` (atomically),
    optionally keeping the central ``crop`` pixels before resizing to ``patch_size``."""
    unknown = sorted({c for _, c, _ in items} - set(classes))
    if unknown:
        where = next(p for p, c, _ in items if c == unknown[0])
        raise InputError(STAGE, where, f"class(es) {unknown} are not among the configured classes "
                         f"{classes} (datasets.<name>.classes)")
    labels = np.array([classes.index(c) for _, c, _ in items], np.int64)
    splits = np.array([SPLITS.index(sp) for _, _, sp in items], np.int8)
    _check_training_classes(labels, splits, classes,
                            Path(os.path.commonpath([p for p, _, _ in items])))
    if patch_size is None:
        patch_size = _load(items[0][0], None, crop).shape[0]
    with atomic_path(out) as tmp:
        writer = StoreWriter(tmp, patch_size, attrs=_meta(classes, patch_size, attrs))
        for s in range(0, len(items), batch):
            chunk = items[s:s + batch]
            imgs = np.stack([_load(p, patch_size, crop) for p, _, _ in chunk])
            n = len(chunk)
            writer.append(imgs, np.full((n, 2), -1), np.full(n, -1), labels[s:s + batch],
                          splits[s:s + batch])
        record_channel_stats(tmp)
    return out


def ingest_npz(path: Path, out: Path, patch_size: int | None, attrs: dict[str, Any],
               class_names: list[str] | None = None) -> Path:
    """Write a MedMNIST-style ``.npz`` into a new patch store at ``out`` (atomically).

    Images must be integers in 0-255, shaped (N, H, W[, 1 or 3]); labels one class index per
    image (N or N x 1), from 0 to the number of classes - 1; every class needs training images.
    """
    if not path.is_file():
        raise InputError(STAGE, path, "npz file does not exist")
    try:
        data = np.load(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(STAGE, path, f"npz cannot be read ({err})") from err
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise InputError(STAGE, path, "holds a single array, not an npz archive of named arrays")
    with data, atomic_path(out) as tmp:
        splits = [s for s in SPLITS if f"{s}_images" in data.files]
        if not splits:
            raise InputError(STAGE, path, "no '<split>_images' arrays (expected MedMNIST keys)")
        labels = {s: _npz_labels(path, f"{s}_labels", _npz_array(data, path, f"{s}_labels"))
                  for s in splits}
        stored = ([str(c) for c in _npz_array(data, path, "class_names")]
                  if "class_names" in data.files else None)
        top = int(max(v.max(initial=0) for v in labels.values()))
        classes = class_names or stored or [str(i) for i in range(top + 1)]
        if top >= len(classes):
            source = "datasets.<name>.classes" if class_names else "its class_names array"
            raise InputError(STAGE, path, f"labels go up to {top} but {len(classes)} classes "
                             f"are named ({source}: {classes})")
        _check_training_classes(np.concatenate(list(labels.values())),
                                np.concatenate([np.full(len(v), SPLITS.index(s), np.int8)
                                                for s, v in labels.items()]), classes, path)
        writer, size = None, patch_size
        for split in splits:  # one split in memory at a time
            imgs = _npz_images(path, f"{split}_images", _npz_array(data, path, f"{split}_images"))
            if len(imgs) != len(labels[split]):
                raise InputError(STAGE, path, f"{split}_labels has {len(labels[split])} labels "
                                 f"for {len(imgs)} images")
            size = size or int(imgs.shape[1])
            if imgs.shape[1:3] != (size, size):
                imgs = np.stack([np.asarray(Image.fromarray(i).resize((size, size),
                                                                      Image.Resampling.BILINEAR))
                                 for i in imgs])
            writer = writer or StoreWriter(tmp, size, attrs=_meta(classes, size, attrs))
            n = len(imgs)
            writer.append(imgs, np.full((n, 2), -1), np.full(n, -1), labels[split],
                          np.full(n, SPLITS.index(split)))
        record_channel_stats(tmp)
    return out


def _npz_array(data: Any, path: Path, key: str) -> np.ndarray:
    """One array of an open npz, or an error naming the key (missing or unreadable)."""
    if key not in data.files:
        raise InputError(STAGE, path, f"array {key!r} is missing (arrays: {sorted(data.files)})")
    try:
        return np.asarray(data[key])
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise InputError(STAGE, path, f"array {key!r} cannot be read ({err})") from err


def _npz_images(path: Path, key: str, imgs: np.ndarray) -> np.ndarray:
    """Images as (N, H, W, 3) uint8; anything but integers in 0-255 is an error, since a cast
    would silently turn float images in [0, 1] into black."""
    if not (imgs.ndim == 3 or (imgs.ndim == 4 and imgs.shape[-1] in (1, 3))):
        raise InputError(STAGE, path, f"{key} has shape {imgs.shape}; expected (N, H, W) or "
                         "(N, H, W, 3)")
    if not np.issubdtype(imgs.dtype, np.integer):
        span = f", values {imgs.min():.3g} to {imgs.max():.3g}" if imgs.size else ""
        raise InputError(STAGE, path, f"{key} has dtype {imgs.dtype}{span}; expected integer "
                         "pixels in 0-255 (uint8)")
    if imgs.size and (imgs.min() < 0 or imgs.max() > 255):
        raise InputError(STAGE, path, f"{key} has values {imgs.min()} to {imgs.max()}; expected "
                         "0-255")
    if imgs.ndim == 3:  # grayscale MedMNIST sets
        imgs = imgs[..., None]
    if imgs.shape[-1] == 1:
        imgs = np.repeat(imgs, 3, -1)
    return imgs.astype(np.uint8)


def _npz_labels(path: Path, key: str, raw: np.ndarray) -> np.ndarray:
    """One non-negative integer class index per image, as (N,) int64."""
    if raw.ndim > 2 or (raw.ndim == 2 and raw.shape[1] != 1):
        raise InputError(STAGE, path, f"{key} has shape {raw.shape}; expected one class index per "
                         "image (one-hot or multi-label arrays are not supported)")
    labels = raw.reshape(-1)
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(STAGE, path, f"{key} has dtype {labels.dtype}; expected integer class "
                         "indices")
    if len(labels) and labels.min() < 0:
        raise InputError(STAGE, path, f"{key} holds label {labels.min()}; class indices start at 0")
    return labels.astype(np.int64)


def _check_training_classes(labels: np.ndarray, splits: np.ndarray, classes: list[str],
                            where: str | os.PathLike) -> None:
    """Every class needs training patches: distillation makes images per class from them."""
    counts = np.bincount(labels[splits == SPLITS.index("train")], minlength=len(classes))
    empty = [c for c, k in zip(classes, counts) if k == 0]
    if empty:
        raise InputError(STAGE, where, f"class(es) {empty} have no training images")


def _meta(classes: list[str], patch_size: int, attrs: dict[str, Any]) -> dict[str, Any]:
    return {"class_names": classes, "split_names": list(SPLITS), "slides": [],
            "patch_size": patch_size, **attrs}


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
