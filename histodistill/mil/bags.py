"""Feature bags: one HDF5 file per slide, in CLAM's layout, and the feature extraction that
writes them (rule ``extract_features``).

A bag file ``<slide>.h5`` holds ``features`` (N, D) float32 and ``coords`` (N, 2) int64
(level-0 x, y of each patch; -1 for synthetic patches, which have no place on the slide), the
datasets CLAM's ``extract_features_fp.py`` writes, so CLAM's tools open them as they are. File
attributes record the slide, its label, split and centre, the kind of bag (``real`` or
``synthetic``) and the encoder. A folder of bags has a manifest ``bags.csv`` (``case_id``,
``slide_id``, ``label`` as CLAM's dataset CSVs, then ``split``, ``centre``, ``patches``).

Extraction streams patches: real bags read one slide's store rows at a time in batches
(:func:`histodistill.data.stream.iterate`), synthetic bags one per-slide distilled set at a time.
Slides are written into ``<out>.partial`` and kept there once done (keyed by encoder and
inputs), so a crashed job resumes slide by slide; ``out`` appears when every slide is done.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import zarr
from tqdm import tqdm

from histodistill.data.store import PatchStore, fingerprint, store_slides
from histodistill.data.stream import iterate
from histodistill.encoders import Encoder, embed_array, load_encoder
from histodistill.io import InputError, atomic_path, settings_hash
from histodistill.state import Pieces

log = logging.getLogger(__name__)
STAGE = "extract_features"
MANIFEST = "bags.csv"
COLUMNS = ("case_id", "slide_id", "label", "split", "centre", "patches")


@dataclass
class Bag:
    """One slide's bag as read back from its file."""

    features: np.ndarray  # (N, D) float32
    coords: np.ndarray  # (N, 2) int64
    attrs: dict[str, Any]


def write_bag(path: str | os.PathLike, features: np.ndarray, coords: np.ndarray,
              attrs: dict[str, Any]) -> Path:
    """Write one bag atomically. Features must be (N, D) with N >= 1 and coords (N, 2): a
    mismatch is an :class:`InputError` naming the file, and nothing is written."""
    features, coords = np.asarray(features), np.asarray(coords)
    _check(path, features.shape, coords.shape)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features.astype(np.float32, copy=False))
            f.create_dataset("coords", data=coords.astype(np.int64, copy=False))
            f.attrs.update({k: _h5_value(v) for k, v in attrs.items()})
    return Path(path)


def read_bag(path: str | os.PathLike) -> Bag:
    """Read a bag written by :func:`write_bag` (or by CLAM); a file that is not a bag, or whose
    ``features`` and ``coords`` disagree, is an :class:`InputError` naming it."""
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("features", "coords") if k not in f]
            if missing:
                raise InputError(STAGE, path, f"not a bag: no {missing} dataset "
                                 f"(has {sorted(f.keys())})")
            _check(path, f["features"].shape, f["coords"].shape)
            return Bag(f["features"][:].astype(np.float32, copy=False), f["coords"][:],
                       {k: _py_value(v) for k, v in f.attrs.items()})
    except OSError as err:
        raise InputError(STAGE, path, f"cannot be read as HDF5 ({err})") from None


def _check(path: str | os.PathLike, features: tuple[int, ...], coords: tuple[int, ...]) -> None:
    if len(features) != 2:
        raise InputError(STAGE, path, f"features must be (patches, dim), got shape {features}")
    if features[0] == 0:
        raise InputError(STAGE, path, "the bag holds no patches (a slide with no patches has "
                         "no bag)")
    if tuple(coords) != (features[0], 2):
        raise InputError(STAGE, path, f"coords have shape {tuple(coords)} but features "
                         f"{tuple(features)}: expected ({features[0]}, 2), one x, y per patch")


def _h5_value(value: Any) -> Any:
    return "" if value is None else value


def _py_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value


# ---- folders of bags ---------------------------------------------------------------------------
def read_manifest(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a bag folder's ``bags.csv`` (``patches`` and ``centre`` as integers)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise InputError(STAGE, path, "bag folder has no manifest (bags.csv)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and set(COLUMNS) - set(rows[0]):
        raise InputError(STAGE, path, f"manifest lacks columns {sorted(set(COLUMNS) - set(rows[0]))}")
    return [{**r, "centre": int(r["centre"]), "patches": int(r["patches"])} for r in rows]


def bag_path(folder: str | os.PathLike, slide: str) -> Path:
    return Path(folder) / f"{slide}.h5"


def folder_bytes(folder: str | os.PathLike, rows: list[dict[str, Any]]) -> int:
    """Bytes on disk of the bag files of ``rows``."""
    return sum(bag_path(folder, r["slide_id"]).stat().st_size for r in rows)


def manifest_row(slide: str, label: str, split: str, centre: int, patches: int) -> dict[str, Any]:
    """One slide's row of a bag folder's manifest (its ``case_id`` is the slide's name)."""
    return {"case_id": slide, "slide_id": slide, "label": label, "split": split,
            "centre": centre, "patches": patches}


def write_manifest(folder: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Write a bag folder's manifest ``bags.csv`` from :func:`manifest_row` rows (the bags
    themselves are written by :func:`write_bag` to :func:`bag_path`)."""
    with open(Path(folder) / MANIFEST, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: r[k] for k in COLUMNS} for r in rows)


def _file_digest(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class _Writer:
    """Bags into ``<out>.partial``, each sealed when written (:class:`Pieces`): finished,
    intact slides of the same key are kept on a rerun, damaged ones redone; renamed onto
    ``out`` with its manifest by :meth:`finish`."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.pieces = Pieces(out)
        self.rows: list[dict[str, Any]] = []

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self.pieces.__exit__(exc_type, *rest)

    def done(self, slide: str, key: str) -> bool:
        return self.pieces.done(bag_path("", slide).name, key)

    def write(self, slide: str, key: str, features: np.ndarray, coords: np.ndarray,
              attrs: dict[str, Any]) -> None:
        write_bag(bag_path(self.pieces.partial, slide), features, coords, {**attrs, "key": key})
        self.pieces.seal(bag_path("", slide).name, key)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def finish(self) -> Path:
        wanted = {bag_path("", r["slide_id"]).name for r in self.rows}
        self.pieces.clear_stale(wanted)
        write_manifest(self.pieces.partial, self.rows)
        return self.pieces.finish(wanted | {MANIFEST})


def extract_real_bags(store_path: str | os.PathLike, encoder_path: str | os.PathLike,
                      out: str | os.PathLike, *, batch: int, buffer_mb: float = 256,
                      progress: bool = True) -> Path:
    """One bag per slide of the store (training and test) with the encoder's features of its
    patches, streamed slide by slide; returns the bag folder ``out``."""
    store = PatchStore(store_path)
    encoder = load_encoder(encoder_path)
    coords = store.array("coords")
    inputs = settings_hash([fingerprint(store), _file_digest(encoder_path)])
    with _Writer(out) as writer:
        for slide in tqdm(store_slides(store), desc="real bags", disable=not progress):
            key = settings_hash([inputs, slide.name, slide.rows.tolist()])
            writer.add(manifest_row(slide.name, slide.label, slide.split, slide.centre, len(slide.rows)))
            if writer.done(slide.name, key):
                continue
            feats = np.concatenate(list(_embed_rows(encoder, store, slide.split, slide.rows, batch,
                                                    buffer_mb)))
            writer.write(slide.name, key, feats, coords[slide.rows],
                         {"slide": slide.name, "label": slide.label, "split": slide.split,
                          "centre": slide.centre, "kind": "real", "encoder": encoder.kind,
                          "patch_size": int(store.attrs["patch_size"])})
        return writer.finish()


def _embed_rows(encoder: Encoder, store: PatchStore, split: str, rows: np.ndarray, batch: int,
                buffer_mb: float) -> Iterator[np.ndarray]:
    for x, _, _ in iterate(store, split, batch, None, buffer_mb, rows=rows):
        yield encoder.embed(torch.from_numpy(x)).cpu().numpy().astype(np.float32)


def extract_synthetic_bags(distilled: list[str | os.PathLike], encoder_path: str | os.PathLike,
                           out: str | os.PathLike, *, batch: int,
                           progress: bool = True) -> Path:
    """One bag per distilled slide (the ``<slide>.zarr`` sets in the ``distilled`` folders of
    rule ``distill_slides``), in slide order; returns the bag folder ``out``."""
    encoder = load_encoder(encoder_path)
    sets = sorted((p for d in distilled for p in Path(d).glob("*.zarr")), key=lambda p: p.name)
    if not sets:
        raise InputError(STAGE, ", ".join(map(str, distilled)), "no per-slide distilled sets")
    digest = _file_digest(encoder_path)
    with _Writer(out) as writer:
        for path in tqdm(sets, desc="synthetic bags", disable=not progress):
            group = zarr.open_group(str(path), mode="r")
            attrs = dict(group.attrs)
            key = settings_hash([digest, attrs["key"]])
            n = int(group["images"].shape[0])
            writer.add(manifest_row(attrs["slide"], attrs["label"], "train", int(attrs["centre"]), n))
            if writer.done(attrs["slide"], key):
                continue
            feats = embed_array(encoder, group["images"][:], batch=batch)
            writer.write(attrs["slide"], key, feats, np.full((n, 2), -1),
                         {"slide": attrs["slide"], "label": attrs["label"], "split": "train",
                          "centre": int(attrs["centre"]), "kind": "synthetic",
                          "method": attrs["method"], "ipc": int(attrs["ipc"]),
                          "encoder": encoder.kind, "patch_size": int(attrs["patch_size"])})
        return writer.finish()
