"""Ingest datasets that are already tiled into the patch-store layout.

Formats: ``imagefolder`` (``root/[split/]class/*.png``), ``npz`` (MedMNIST keys
``train_images``, ``train_labels``, ``val_*``, ``test_*``; e.g. PathMNIST) and ``csv`` (a label
CSV per split naming image files, e.g. UniToPath). Patches are resized to ``patch_size`` when
given; coordinates and slides are -1 (unknown).
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from histodistill.data.stream import record_channel_stats
from histodistill.io import InputError, atomic_path, confine, dataset_root, did_you_mean, read_csv
from histodistill.data.store import SPLITS, StoreWriter

STAGE = "ingest"
log = logging.getLogger(__name__)
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}  # matched ignoring case


MIN_SIZE = 8  # px: below it a ConvNet's three poolings leave nothing of a patch
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
CONVERTED = {"L": "grayscale, expanded to RGB", "1": "bilevel, expanded to RGB",
             "P": "palette, converted to RGB", "CMYK": "CMYK, converted to RGB",
             "YCbCr": "YCbCr, converted to RGB", "RGBX": "RGBX, padding dropped"}


class ImagePolicy:
    """How pre-tiled image files become RGB uint8 patches (README: "Bad input", images), with
    a count of every conversion for the rule log.

    - 8-bit RGB is taken as it is; grayscale, bilevel, palette, CMYK and YCbCr are converted
      to RGB; 16-bit grayscale is scaled to 8 bits (v / 257, rounded), never clipped; Pillow
      reads 16-bit RGB PNGs as 8-bit (their high byte);
    - transparency (RGBA, LA, PA, a palette or colour key with transparency) is composited on
      white, the colour of empty glass;
    - refused, naming the file: floating-point or 32-bit integer pixels outside 0-65535 (an
      ambiguous range), multi-frame files (multi-page TIFF, animated GIF/PNG), other pixel
      modes, images smaller than :data:`MIN_SIZE`, non-square images without ``center_crop``,
      unreadable files;
    - sizes: without ``patch_size`` every image must have the first one's size (mixed sizes are
      an error that names both); with it, every other size is resized to it with Pillow's
      antialiased bilinear filter, and the resized counts are logged per original size.
    """

    def __init__(self, size: int | None, crop: int | None) -> None:
        self.size, self.crop, self.resize = size, crop, size is not None
        self.first: Path | None = None
        self.counts: dict[str, int] = {}

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def read(self, path: Path) -> np.ndarray:
        """One patch, (size, size, 3) uint8."""
        try:
            with Image.open(path) as im:
                frames = getattr(im, "n_frames", 1)
                if frames > 1:
                    raise InputError(STAGE, path, f"holds {frames} frames (a multi-page or "
                                     "animated file); give one patch per file")
                rgb = self._rgb(im, path)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
                Image.DecompressionBombError) as err:
            raise InputError(STAGE, path, f"image cannot be read ({err})") from err
        return self._shape(rgb, path)

    def _rgb(self, im: Image.Image, path: Path) -> np.ndarray:
        mode = im.mode
        if mode in SIXTEEN_BIT:
            values = np.asarray(im).astype(np.int64)
            if values.size and (values.min() < 0 or values.max() > 65535):
                raise InputError(STAGE, path, f"{mode} pixels span {values.min()} to "
                                 f"{values.max()}, outside 16 bits; convert it to 8-bit RGB")
            self._count("16-bit grayscale, scaled to 8 bits")
            gray = np.round(values / 257).astype(np.uint8)
            return np.repeat(gray[..., None], 3, -1)
        if mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
            self._count(f"{mode} with transparency, composited on white")
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(white, im.convert("RGBA")).convert("RGB"))
        if mode == "RGB":
            return np.asarray(im)
        if mode in CONVERTED:
            self._count(f"{mode} ({CONVERTED[mode]})")
            return np.asarray(im.convert("RGB"))
        raise InputError(STAGE, path, f"pixel mode {mode!r} is not supported (8 or 16-bit "
                         "grayscale, RGB, RGBA, palette, CMYK or YCbCr; floating-point pixels "
                         "have no agreed range): convert it to 8-bit RGB")

    def _shape(self, rgb: np.ndarray, path: Path) -> np.ndarray:
        h, w = rgb.shape[:2]
        if min(h, w) < MIN_SIZE:
            raise InputError(STAGE, path, f"is {w}x{h} px, smaller than {MIN_SIZE} px")
        if self.crop:
            if self.crop > min(w, h):
                raise InputError(STAGE, path, f"center_crop={self.crop} exceeds the image ({w}x{h})")
            top, left = (h - self.crop) // 2, (w - self.crop) // 2
            rgb, h, w = rgb[top:top + self.crop, left:left + self.crop], self.crop, self.crop
        if h != w:
            raise InputError(STAGE, path, f"is {w}x{h} px, not square; set center_crop to keep "
                             "its central square (nothing is squashed)")
        if self.first is None:
            self.first, self.size = path, self.size or h
        elif not self.resize and h != self.size:  # mixed sizes need an explicit patch_size
            raise InputError(STAGE, path, f"is {h} px but {self.first} is {self.size} px: "
                             "images of mixed sizes; set datasets.<name>.patch_size to resize "
                             "them all to one size (bilinear)")
        assert self.size is not None  # set from the first image when not configured
        if h != self.size:
            self._count(f"{h} px, resized to {self.size} px (bilinear, antialiased)")
            rgb = np.asarray(Image.fromarray(rgb).resize((self.size, self.size),
                                                         Image.Resampling.BILINEAR))
        return np.ascontiguousarray(rgb)

    def log_counts(self, total: int) -> None:
        """One log line per conversion applied, with its count."""
        for what, n in sorted(self.counts.items()):
            log.info("%d of %d images: %s", n, total, what)


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
    for base in [root, *split_dirs.values()]:  # an image beside the class folders has no class
        loose = sorted(p.name for p in base.iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        if loose:
            raise InputError(STAGE, base, f"{len(loose)} image file(s) outside any class folder "
                             f"({', '.join(loose[:3])}); put each image in its class's folder "
                             "(root/[split/]class/)")
    for split, base in split_dirs.items() or [("", root)]:
        for cls_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            images = _class_images(cls_dir)
            if not images:
                raise InputError(STAGE, cls_dir, "class folder holds no images; remove it or "
                                 "add its images (an empty class would be left out unnoticed)")
            items += [(path, cls_dir.name, split) for path in images]
    if not items:
        raise InputError(STAGE, root, "no images found (expected root/[split/]class/*.png)")
    folded: dict[str, str] = {}
    for path, cls, _ in items:  # class folders are matched exactly, as labels are
        first = folded.setdefault(cls.strip().lower(), cls)
        if first != cls or cls != cls.strip():
            raise InputError(STAGE, path.parent, f"class folder {cls!r} differs from {first!r} "
                             "only in case or spaces; name each class's folders alike")
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


IGNORED_FILES = {"Thumbs.db", "desktop.ini"}  # written by file browsers, never images


def _class_images(cls_dir: Path) -> list[Path]:
    """The image files of one class folder. A nested folder is an error (its images would be
    counted as this class); a file without an image extension is refused by name; hidden files
    and file-browser files (``.DS_Store``, ``Thumbs.db``) are skipped, with a log line."""
    images, skipped = [], []
    for path in sorted(cls_dir.iterdir()):
        if path.name.startswith(".") or path.name in IGNORED_FILES:
            skipped.append(path.name)
        elif path.is_dir():
            raise InputError(STAGE, path, f"a folder inside class folder {cls_dir.name!r}: its "
                             f"images would be counted as class {cls_dir.name!r}; move it out of "
                             "the dataset or make it a class folder of its own")
        elif path.suffix.lower() in IMAGE_EXTS:
            images.append(path)
        else:
            raise InputError(STAGE, path, f"not an image file (extensions read: "
                             f"{sorted(IMAGE_EXTS)}); remove it from the class folder")
    if skipped:
        log.info("%s: skipped %d hidden or file-browser files (%s)", cls_dir, len(skipped),
                 ", ".join(skipped[:3]))
    return images


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
    """(path, class, split) from one label CSV per split (``csv: {train: ..., test: ...}``).

    Every image path must stay inside ``root`` (no absolute paths, no ``..`` out of it); a file
    listed twice, in one split or in two, is an error naming both rows. Labels are taken exactly
    as written: a label that differs from another only in case or spaces is an error.
    """
    image_col = dataset["image_column"]
    label_col = dataset["label_column"]
    image_dir = dataset["image_dir"]
    items, rows = [], []
    seen: dict[Path, str] = {}
    roots = [root, *dataset["extra_roots"]]
    for split, rel in dataset["csv"].items():
        path = Path(str(rel).format(root=root))
        if split not in SPLITS:
            raise InputError(STAGE, path, f"csv key {split!r} is not a split; use {list(SPLITS)}")
        if not path.is_file():
            raise InputError(STAGE, path, f"label CSV for split {split!r} does not exist")
        for line, rec in read_csv(path, STAGE, [image_col, label_col], [image_col, label_col]):
            where = f"{path}, line {line}"
            label, name = rec[label_col], rec[image_col]
            folder = root / image_dir.format(split=split, label=label)
            image = confine(folder / name, roots, STAGE, where, "image")  # compared
            if image in seen:
                raise InputError(STAGE, where, f"image {name!r} is listed again (first at "
                                 f"{seen[image]}); a patch belongs to one row of one split")
            seen[image] = where
            items.append((folder / name, label, split))
            rows.append(where)
    if not items:
        raise InputError(STAGE, root,
                         f"the label CSVs {sorted(dataset['csv'].values())} list no images")
    folded: dict[str, str] = {}
    for (_, label, _), where in zip(items, rows):
        first = folded.setdefault(label.strip().lower(), label)
        if label != label.strip() or first != label:
            other = f"{first!r}" if first != label else "its stripped form"
            raise InputError(STAGE, where, f"label {label!r} differs from {other} only in case "
                             "or spaces; labels are matched exactly: write one spelling")
    labels = sorted(set(folded.values()))
    return items, labels


def ingest_images(items: list[tuple[Path, str, str]], classes: list[str], out: Path,
                  patch_size: int | None, attrs: dict[str, Any], *, batch: int = 512,
                  crop: int | None = None, dedupe: bool) -> Path:
    """Write (path, class, split) items into a new patch store at ``out`` (atomically),
    optionally keeping the central ``crop`` pixels before resizing to ``patch_size``
    (:class:`ImagePolicy`). The same pixels in two splits (a leak between training and test)
    are an error naming both files, unless ``dedupe``: then rows are written split by split
    (train, val, test) and the copy in the later split is dropped and counted. Within one split, identical patches are
    kept and counted in the log (public sets, PCam among them, hold some)."""
    unknown = sorted({c for _, c, _ in items} - set(classes))
    if unknown:
        where = next(p for p, c, _ in items if c == unknown[0])
        raise InputError(STAGE, where, f"class {unknown[0]!r} is not among the configured "
                         f"classes {classes} (datasets.<name>.classes; classes are matched "
                         f"exactly){did_you_mean(unknown[0], classes)}")
    _check_training_classes(np.array([classes.index(c) for _, c, _ in items], np.int64),
                            np.array([SPLITS.index(sp) for _, _, sp in items], np.int8), classes,
                            Path(os.path.commonpath([p for p, _, _ in items])))
    if dedupe:  # the copy kept is the one in the earliest split (training is never thinned)
        items = sorted(items, key=lambda it: SPLITS.index(it[2]))
    policy = ImagePolicy(patch_size, crop)
    seen: dict[bytes, tuple[Path, str]] = {}
    dropped, repeats = [], 0

    def admitted(chunk: list[tuple[Path, str, str]]) -> tuple[list[np.ndarray], list[int]]:
        nonlocal repeats
        imgs, kept = [], []
        for k, (path, _, split) in enumerate(chunk):
            img = policy.read(path)
            digest = hashlib.sha1(img.tobytes()).digest()
            if digest in seen and seen[digest][1] != split:
                if not dedupe:
                    raise InputError(STAGE, path, f"holds the same pixels as {seen[digest][0]} "
                                     f"({seen[digest][1]} split): a patch in two splits leaks "
                                     "between training and test; remove one, or set "
                                     "datasets.<name>.dedupe: true to drop the later copy")
                dropped.append(path)
                continue
            repeats += digest in seen
            seen.setdefault(digest, (path, split))
            imgs.append(img)
            kept.append(k)
        return imgs, kept

    with atomic_path(out) as tmp:
        writer = None
        for s in range(0, len(items), batch):
            chunk = items[s:s + batch]
            imgs, kept = admitted(chunk)
            if not kept:
                continue
            assert policy.size is not None  # set by the first image read
            writer = writer or StoreWriter(tmp, policy.size, attrs=_meta(classes, policy.size, attrs))
            lab = np.array([classes.index(chunk[k][1]) for k in kept], np.int64)
            spl = np.array([SPLITS.index(chunk[k][2]) for k in kept], np.int8)
            n = len(kept)
            writer.append(np.stack(imgs), np.full((n, 2), -1), np.full(n, -1), lab, spl)
        record_channel_stats(tmp)
    policy.log_counts(len(items))
    if repeats:
        log.info("%d patches repeat the pixels of another patch of their split (kept)", repeats)
    if dropped:
        log.warning("dedupe: dropped %d patches whose pixels are in an earlier split (first: %s)",
                    len(dropped), dropped[0])
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
        repeated = sorted({c for c in classes if classes.count(c) > 1})
        if repeated:
            raise InputError(STAGE, path, f"class name(s) {repeated} appear more than once in "
                             f"its class_names array ({classes}); name each class once")
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
            h, w = int(imgs.shape[1]), int(imgs.shape[2])
            if h != w or h < MIN_SIZE:
                raise InputError(STAGE, path, f"{split}_images are {w}x{h} px; patches must be "
                                 f"square and at least {MIN_SIZE} px (nothing is squashed)")
            if size is None:
                size = h
            elif h != size and patch_size is None:  # mixed sizes need an explicit patch_size
                raise InputError(STAGE, path, f"{split}_images are {h} px but {splits[0]}_images "
                                 f"{size} px; set datasets.<name>.patch_size to resize them all "
                                 "to one size (bilinear)")
            if h != size:
                log.info("%s: %d images of %d px resized to %d px (bilinear, antialiased)",
                         split, len(imgs), h, size)
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
    if len(labels) and labels.max() > np.iinfo(np.int64).max:  # a uint64 that int64 would wrap
        raise InputError(STAGE, path, f"{key} holds label {labels.max()}, not a class index")
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
    root = dataset_root(name, dataset, STAGE)
    out = Path(out)
    size = dataset.get("patch_size")
    attrs = {"source": dataset["format"], "dataset": name, **(attrs or {})}
    fmt = dataset["format"]
    if fmt == "npz":
        return ingest_npz(Path(str(dataset["file"]).format(root=root)), out, size,
                          attrs, dataset.get("classes"))
    if fmt == "imagefolder":
        items, classes = imagefolder_items(root, float(dataset["test_fraction"]),
                                           int(dataset["seed"]))
    else:
        items, classes = csv_items(root, dataset)
    return ingest_images(items, dataset.get("classes") or classes, out, size, attrs,
                         crop=dataset.get("center_crop"), dedupe=bool(dataset["dedupe"]))
