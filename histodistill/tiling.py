"""Tile a WSI cohort into the patch store: mask, grid, labels, caps, fast reads; resumable.

The store is built in ``<out>.partial`` and renamed onto ``<out>`` only when every slide is
done, so a crash never leaves a half store at the output path. A state file in the partial
store records finished slides; a rerun with the same settings resumes after the last one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from histodistill import annotations, wsi
from histodistill.data.stream import record_channel_stats
from histodistill.io import InputError, settings_hash
from histodistill.store import SPLITS, StoreWriter

log = logging.getLogger(__name__)
STAGE = "tile"


def plan_slide(path: str | os.PathLike, annotation: str, slide_label: str, index: int,
               cfg: dict[str, Any], class_names: list[str]) -> tuple[np.ndarray, np.ndarray, wsi.SlideGeometry]:
    """Decide which patches of one slide to keep and their labels, without reading pixels.

    Returns level-0 corners (N, 2), label indices (N,) and the read geometry. Raises
    :class:`InputError` naming the slide when it has no tissue or cannot be read.
    """
    slide = wsi.open_slide(path, STAGE)
    try:
        geom = wsi.geometry(slide, path, cfg["magnification"], cfg["patch_size"], cfg["stride"],
                            cfg.get("default_mpp"))
        mask, down = wsi.tissue_mask(slide, path, geom.base_mpp, cfg["mask_mpp"], cfg["mask_max_size"],
                                     cfg["min_saturation"])
        dims = slide.dimensions
        coords = wsi.grid(*dims, geom)
    finally:
        slide.close()
    if not mask.any():
        raise InputError(STAGE, path, "no tissue found (Otsu mask is empty)")
    size0 = geom.patch_size * geom.scale
    keep = wsi.box_fraction(mask, down, coords, size0) >= cfg["tissue_threshold"]
    coords = coords[keep]
    if len(coords) == 0:
        raise InputError(STAGE, path, f"no patch reaches tissue_threshold={cfg['tissue_threshold']}")
    cap = int(cfg.get("max_patches_per_slide") or 0)
    if cap and len(coords) > cap:
        rng = np.random.default_rng([int(cfg["seed"]), index])
        coords = coords[np.sort(rng.choice(len(coords), cap, replace=False))]
    default = slide_label if cfg["unannotated_label"] == "slide" else cfg["unannotated_label"]
    labels = np.full(len(coords), _class_index(default, class_names, path), np.int64)
    if annotation:
        ann = annotations.read_asap_xml(annotation, cfg["tumour_groups"], cfg["exclusion_groups"],
                                        STAGE, cfg["ignore_groups"], dims)
        frac = annotations.tumour_fraction(ann, coords, size0)
        labels[frac >= cfg["tumour_overlap"]] = _class_index(cfg["tumour_class"], class_names, path)
    return coords, labels, geom


def _class_index(label: str, class_names: list[str], path: str | os.PathLike) -> int:
    if label not in class_names:
        raise InputError(STAGE, path, f"label {label!r} is not one of the classes {class_names}")
    return class_names.index(label)


def class_names(rows: list[dict[str, Any]], cfg: dict[str, Any],
                configured: list[str] | None = None) -> list[str]:
    """The dataset's classes: as configured, else the slide labels plus the tumour class."""
    return list(configured) if configured else sorted({r["label"] for r in rows} | {cfg["tumour_class"]})


def tile_cohort(rows: list[dict[str, Any]], cfg: dict[str, Any], out: str | os.PathLike,
                class_names: list[str], attrs: dict[str, Any] | None = None,
                progress: bool = True) -> Path:
    """Tile every slide in ``rows`` (a slide table) into a new patch store at ``out``."""
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    state_file = partial / "tiling_state.json"
    key = settings_hash({"rows": rows, "cfg": cfg, "classes": class_names})
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if state.get("key") != key:
        shutil.rmtree(partial, ignore_errors=True)
        state = {"key": key, "done": [], "n": 0, "skipped": []}
    elif state["done"]:
        log.info("resuming tiling after %d finished slides", len(state["done"]))
    meta = {"class_names": class_names, "split_names": list(SPLITS),
            "slides": [r["slide"] for r in rows], "source": "wsi",
            "magnification": cfg["magnification"], "patch_size": cfg["patch_size"],
            "stride": cfg["stride"], "tiling": cfg, **(attrs or {})}
    writer = StoreWriter(partial, cfg["patch_size"], attrs=meta)
    writer.truncate(state["n"])  # drop a slide left half-written by a crash
    slide_meta = dict(writer.group.attrs.get("slide_meta", {}))
    bar = tqdm(total=len(rows), desc="tiling slides", disable=not progress, unit="slide")
    for i, row in enumerate(rows):
        bar.update(1)
        if row["slide"] in state["done"] or row["slide"] in state["skipped"]:
            continue
        try:
            coords, labels, geom = plan_slide(row["path"], row["annotation"], row["label"], i,
                                              cfg, class_names)
        except InputError as err:
            if cfg.get("skip_empty") and "tissue" in str(err):
                log.warning("skipping: %s", err)
                state["skipped"].append(row["slide"])
                _save_state(state_file, state)
                continue
            raise
        patches = wsi.read_patches(row["path"], coords, geom, threads=int(cfg["threads"]))
        n = len(coords)
        writer.append(patches, coords, np.full(n, i), labels,
                      np.full(n, SPLITS.index(row["split"])))
        slide_meta[row["slide"]] = {"level": geom.level, "base_mpp": geom.base_mpp,
                                    "base_magnification": geom.base_mag, "patches": n,
                                    "label": row["label"], "centre": row["centre"]}
        writer.group.attrs["slide_meta"] = slide_meta
        state["done"].append(row["slide"])
        state["n"] = writer.n
        _save_state(state_file, state)
        log.info("%s: %d patches (level %d, read %d px)", row["slide"], n, geom.level,
                 geom.read_size)
    bar.close()
    writer.group.attrs["skipped_slides"] = state["skipped"]
    record_channel_stats(partial)
    state_file.unlink()
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    return out


def _save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)
