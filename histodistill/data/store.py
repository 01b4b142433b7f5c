"""The patch store: one zarr group per dataset, the same layout whatever the source.

Arrays: ``patches`` (N, 3, H, W) uint8 chunked along N, ``coords`` (N, 2) int64 level-0 x, y
(-1 for pre-tiled data), ``slide`` (N,) int32 index into attr ``slides`` (-1 when unknown),
``label`` (N,) int64 index into attr ``class_names``, ``split`` (N,) int8 index into attr
``split_names``. Attrs also record mpp, magnification, patch size and the config that made it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from histodistill.io import InputError, settings_hash

SPLITS = ("train", "val", "test")
FIELDS = {"coords": (np.int64, (2,)), "slide": (np.int32, ()), "label": (np.int64, ()),
          "split": (np.int8, ())}


class StoreWriter:
    """Append patches slide by slide to a new zarr store; resumable via :attr:`n`."""

    def __init__(self, path: str | os.PathLike, patch_size: int, chunk: int = 64,
                 attrs: dict[str, Any] | None = None) -> None:
        self.group = zarr.open_group(str(path), mode="a")
        if "patches" not in self.group:
            comp = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
            self.group.create_array("patches", shape=(0, 3, patch_size, patch_size), dtype="uint8",
                                    chunks=(chunk, 3, patch_size, patch_size), compressors=comp)
            for name, (dtype, tail) in FIELDS.items():
                self.group.create_array(name, shape=(0, *tail), dtype=dtype,
                                        chunks=(max(chunk * 64, 4096), *tail))
        if attrs:
            self.group.attrs.update(attrs)

    @property
    def n(self) -> int:
        """Number of patches written so far."""
        return self.group["patches"].shape[0]

    def truncate(self, n: int) -> None:
        """Drop rows beyond ``n`` (discard a slide that was half written when a run died)."""
        for name in ("patches", *FIELDS):
            arr = self.group[name]
            arr.resize((n, *arr.shape[1:]))

    def append(self, patches: np.ndarray, coords: np.ndarray, slide: np.ndarray,
               label: np.ndarray, split: np.ndarray) -> None:
        """Append rows; ``patches`` may be (N, H, W, 3) or (N, 3, H, W) uint8.

        Every array must hold the same number of rows and the store's row shape: zarr would
        silently truncate or broadcast a mismatched write. Raises ValueError before writing.
        """
        if patches.ndim == 4 and patches.shape[-1] == 3 and patches.shape[1] != 3:
            patches = patches.transpose(0, 3, 1, 2)
        n, m = self.n, len(patches)
        values = {"patches": np.asarray(patches), "coords": np.asarray(coords),
                  "slide": np.asarray(slide), "label": np.asarray(label),
                  "split": np.asarray(split)}
        for name, value in values.items():
            want = (m, *self.group[name].shape[1:])
            if value.shape != want:
                raise ValueError(f"store {self.group.store}: {name} has shape {value.shape}, "
                                 f"expected {want} (rows must match the {m} patches)")
        for name, value in values.items():
            arr = self.group[name]
            arr.resize((n + m, *arr.shape[1:]))
            arr[n:n + m] = value.astype(arr.dtype, copy=False)


def chunk_files(path: str | os.PathLike) -> dict[str, int]:
    """Chunk files per array of the store at ``path`` (recorded when a store is finished and
    checked on every open: zarr reads a deleted chunk as zeros without a word)."""
    root = Path(path)
    return {name: sum(1 for f in (root / name).rglob("*") if f.is_file() and f.name != "zarr.json")
            for name in ("patches", *FIELDS) if (root / name).is_dir()}


@dataclass(init=False)
class PatchStore:
    """Read access to a patch store; arrays are loaded lazily from zarr. Opened from any path
    (``str`` or ``os.PathLike``), kept as a :class:`Path`."""

    path: Path

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.group = zarr.open_group(str(self.path), mode="r")
        self.attrs: dict[str, Any] = dict(self.group.attrs)
        recorded = self.attrs.get("chunk_files")
        if recorded is not None and (found := chunk_files(self.path)) != recorded:
            short = {k: f"{found.get(k, 0)} of {n}" for k, n in recorded.items()
                     if found.get(k, 0) != n}
            # zarr reads a missing chunk as zeros: black patches and class-0 labels, silently
            raise InputError("store", self.path, f"chunk files differ from those recorded when "
                             f"it was built ({short}): a damaged or partial copy; delete it so "
                             "that the rule that wrote it builds it again")

    def __len__(self) -> int:
        return self.group["patches"].shape[0]

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs["class_names"])

    def array(self, name: str) -> np.ndarray:
        """Load a whole metadata array (``coords``, ``slide``, ``label``, ``split``)."""
        return self.group[name][:]

    def content_digest(self) -> str:
        """A cheap key for the store's contents, without reading the patches: the bytes of the
        metadata arrays (labels, splits, slides, coords) and the name, size and modification
        time of every patch chunk file, so any rewrite of a patch (or a copy) changes it."""
        digest = hashlib.sha256()
        for name in FIELDS:
            digest.update(np.ascontiguousarray(self.array(name)).tobytes())
        chunks = self.path / "patches"
        for f in sorted(chunks.rglob("*")):
            if f.is_file():
                st = f.stat()
                digest.update(f"{f.relative_to(chunks)}:{st.st_size}:{st.st_mtime_ns};".encode())
        return digest.hexdigest()[:16]

    def split_counts(self, split: str) -> dict[str, int]:
        """Patches per class in one split, by class name."""
        labels = self.array("label")[self.indices(split)]
        counts = np.bincount(labels, minlength=len(self.class_names))
        return {name: int(n) for name, n in zip(self.class_names, counts)}

    def check_ipc(self, ipc: int, stage: str) -> None:
        """An :class:`InputError` when a class has fewer training patches than ``ipc`` (every
        method starts from, or picks, ``ipc`` real patches per class)."""
        short = {c: n for c, n in self.split_counts("train").items() if n < ipc}
        if short:
            name, n = next(iter(short.items()))
            raise InputError(stage, self.path, f"ipc {ipc} exceeds the {n} training patches of "
                             f"class {name!r} (per class: {self.split_counts('train')}); choose "
                             f"ipc <= {min(self.split_counts('train').values())}")

    def indices(self, split: str) -> np.ndarray:
        """Row indices of one split."""
        return np.flatnonzero(self.array("split") == SPLITS.index(split))

    def patches(self, index: np.ndarray | slice | None = None) -> np.ndarray:
        """Patches (N, 3, H, W) uint8 for sorted row indices, a slice, or all rows."""
        arr = self.group["patches"]
        if index is None:
            return arr[:]
        if isinstance(index, slice):
            return arr[index]
        index = np.asarray(index)
        return arr.get_orthogonal_selection((index, slice(None), slice(None), slice(None)))


def fingerprint(store: PatchStore, *files: str | os.PathLike | None) -> str:
    """A cheap key for the contents of a run's inputs: the store's attributes (which record its
    channel statistics and the config that built it), size and content digest, and the bytes of
    small files (pool, template)."""
    parts: list[Any] = [store.attrs, len(store), store.content_digest()]
    for f in files:
        if f:
            parts.append(hashlib.sha256(Path(f).read_bytes()).hexdigest())
    return settings_hash(parts)


@dataclass(frozen=True)
class Slide:
    """One slide of a WSI patch store: its table position (the ``slide`` value of its rows),
    slide-level label, split, centre (-1 when unknown) and store rows."""

    name: str
    index: int
    label: str
    split: str
    centre: int
    rows: np.ndarray


def store_slides(store: PatchStore) -> list[Slide]:
    """The slides of a tiled store that have patches, in slide-table order.

    Slides the tiler skipped (no tissue, ``skip_empty``) have no rows and are left out. A store
    without slides (pre-tiled patches) is an :class:`~histodistill.io.InputError` naming it.
    """
    names = store.attrs.get("slides")
    if not names:
        raise InputError("slides", store.path, "the store records no slides (pre-tiled patches "
                         "have no slide-level labels)")
    meta = store.attrs.get("slide_meta", {})
    slide, split = store.array("slide"), store.array("split")
    order = np.argsort(slide, kind="stable")
    bounds = np.searchsorted(slide[order], np.arange(len(names) + 1))
    out = []
    for i, name in enumerate(names):
        rows = np.sort(order[bounds[i]:bounds[i + 1]]).astype(np.int64)
        if not len(rows):
            continue
        if name not in meta:
            raise InputError("slides", store.path, f"slide {name!r} has patches but no slide_meta")
        splits = np.unique(split[rows])
        if len(splits) != 1:
            raise InputError("slides", store.path, f"slide {name!r} has patches in several splits")
        out.append(Slide(name, i, str(meta[name]["label"]), SPLITS[int(splits[0])],
                         int(meta[name].get("centre", -1)), rows))
    return out
