"""Rule ``select``: ``ipc`` images per class chosen from a pool by a registered selector, written
in the distilled-set format (:mod:`histodistill.distilled`), so ``evaluate``, the result join and
later stages read it as they read a distilled set."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from histodistill.data.stream import read_rows
from histodistill.data.store import PatchStore
from histodistill.distilled import peak_memory_mb, write_distilled
from histodistill.encoders import load_encoder
from histodistill.runtime import device
from histodistill.io import InputError
from histodistill.registry import import_catalogued
from histodistill.select.base import Candidates, Context, Selector, build

__registry__ = "select"
import_catalogued(__registry__)  # the selectors of the catalogue's selection methods

log = logging.getLogger(__name__)
STAGE = "select"


def open_pool(pool_path: str | os.PathLike, real: PatchStore, stage: str) -> PatchStore:
    """The pool store, checked against the real store's classes and patch size."""
    pool = PatchStore(pool_path)
    if pool.class_names != real.class_names:
        raise InputError(stage, pool_path, f"classes {pool.class_names} differ from the real "
                         f"store's {real.class_names}")
    if int(pool.attrs["patch_size"]) != int(real.attrs["patch_size"]):
        raise InputError(stage, pool_path, f"patch size {pool.attrs['patch_size']} differs from "
                         f"the real store's {real.attrs['patch_size']}")
    return pool


def selection_context(cfg: dict[str, Any], seed: int, pool: PatchStore, real: PatchStore,
                      encoder_path: str | os.PathLike | None) -> Context:
    encoder = load_encoder(encoder_path, device()) if encoder_path else None
    return Context(Candidates(pool, encoder, per_class=int(cfg["pool_per_class"]), seed=seed),
                   real, encoder, seed)


def per_class(selector: Selector, pool: Candidates, k: int, stage: str) -> np.ndarray:
    """Positions into the candidates: ``k`` selected of every class, class by class."""
    chosen = []
    for c, name in enumerate(pool.store.class_names):
        have = len(pool.of_class(c))
        if have < k:
            raise InputError(stage, pool.store.path, f"class {name!r} has {have} candidates, "
                             f"fewer than the {k} asked for")
        pos = selector.select(c, k)
        if len(np.unique(pos)) != k or (pool.labels[pos] != c).any():
            raise RuntimeError(f"selector {selector.name!r} returned a wrong selection for class {c}")
        chosen.append(pos)
    return np.concatenate(chosen)


def select(method: str, cfg: dict[str, Any], ipc: int, *, seed: int, pool_path: str | os.PathLike,
           store_path: str | os.PathLike, encoder_path: str | os.PathLike | None,
           out_zarr: str | os.PathLike, out_png: str | os.PathLike,
           out_json: str | os.PathLike) -> np.ndarray:
    """Select ``ipc`` images per class from the pool with ``cfg['selector']`` and write set, grid
    and cost; returns the pool rows chosen."""
    start = time.perf_counter()
    real = PatchStore(store_path)
    pool = open_pool(pool_path, real, STAGE)
    ctx = selection_context(cfg, seed, pool, real, encoder_path)
    rows = ctx.pool.rows[per_class(build(cfg["selector"], cfg, ctx), ctx.pool, ipc, STAGE)]
    labels = np.repeat(np.arange(len(real.class_names)), ipc)
    attrs = {"method": method, "ipc": ipc, "seed": seed, "config": cfg,
             "source_store": str(pool_path), "class_names": real.class_names,
             "selected_rows": rows.tolist()}
    real_pool = Path(pool_path).resolve() == Path(store_path).resolve()  # real patches: provenance
    write_distilled(read_rows(pool, rows), labels, attrs, out_zarr, out_png, out_json,
                    {"seconds": time.perf_counter() - start, "peak_mem_mb": peak_memory_mb(),
                     "device": str(device()), "pool": str(pool_path), "candidates": len(ctx.pool.rows)},
                    rows if real_pool else None)
    log.info("selected %d images per class from %d candidates", ipc, len(ctx.pool.rows))
    return rows
