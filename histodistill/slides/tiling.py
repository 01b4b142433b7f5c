"""Tile a WSI cohort into the patch store: one job per slide batch, then a gather.

:func:`tile_slides` tiles some slides of the slide table into one small store per slide, built
in ``<out>.partial`` and renamed onto ``<out>`` when the batch is done; a slide finished before a
crash is kept there (sealed with its settings, file and contents: :class:`histodistill.state.Pieces`)
and not redone; a damaged one is redone. :func:`gather` concatenates
the per-slide stores in slide-table order into the dataset's patch store, records the channel
statistics and renames it into place. :func:`tile_cohort` runs both in one process.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from histodistill.slides import annotations as asap, wsi
from histodistill.data.stream import record_channel_stats
from histodistill.io import did_you_mean, InputError, settings_hash
from histodistill.data.store import FIELDS, SPLITS, StoreWriter
from histodistill.state import Pieces

log = logging.getLogger(__name__)
STAGE = "tile"
OPERATIONAL = ("threads", "slides_per_job")  # change how tiling runs, never a patch
CHECK_SETTINGS = ("tumour_class", "unannotated_label")  # what check_cohort reads
GATHER_ROWS = 1024  # rows copied at a time by the gather (bounded memory per slide)
# cap on the patch buffer a slide is read into, chunk by chunk: a fresh buffer's first touch
# costs (0.4 s of system time for 256 MiB on a VM), more chunks cost next to nothing
READ_BYTES = 64 * 2**20


def plan_slide(path: str | os.PathLike, annotation: str, slide_label: str, index: int,
               cfg: dict[str, Any], class_names: list[str], *, threads: int
               ) -> tuple[np.ndarray, np.ndarray, wsi.SlideGeometry]:
    """Decide which patches of one slide to keep and their labels, without reading pixels (the
    mask level decoded in ``threads`` threads, an operational setting: the patches are the same).

    Returns level-0 corners (N, 2), label indices (N,) and the read geometry. Raises
    :class:`InputError` naming the slide when it has no tissue or cannot be read.
    """
    slide = wsi.open_slide(path, STAGE)
    try:
        geom = wsi.geometry(slide, path, cfg["magnification"], cfg["patch_size"], cfg["stride"],
                            cfg.get("default_mpp"))
        mask, down = wsi.tissue_mask(slide, path, geom.base_mpp, mask_mpp=cfg["mask_mpp"],
                                     max_size=cfg["mask_max_size"],
                                     min_saturation=cfg["min_saturation"], threads=threads)
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
    cap = int(cfg["max_patches_per_slide"])
    if cap and len(coords) > cap:
        rng = np.random.default_rng([int(cfg["seed"]), index])
        coords = coords[np.sort(rng.choice(len(coords), cap, replace=False))]
    default = slide_label if cfg["unannotated_label"] == "slide" else cfg["unannotated_label"]
    labels = np.full(len(coords), _class_index(default, class_names, path), np.int64)
    if annotation:
        ann = asap.read_asap_xml(annotation, tumour_groups=cfg["tumour_groups"],
                                 exclusion_groups=cfg["exclusion_groups"], stage=STAGE,
                                 ignore_groups=cfg["ignore_groups"], bounds=dims)
        frac = asap.tumour_fraction(ann, coords, size0)
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


def check_cohort(name: str, rows: list[dict[str, Any]], cfg: dict[str, Any], *,
                 class_names: list[str], unannotated: Collection[str] = ()) -> None:
    """Check a slide table before any tiling job is queued, so a wrong root fails at once.

    Slide names are unique, every slide file opens with OpenSlide, every label the tiler will
    assign is a class, and every annotation listed exists. Slides labelled with the tumour class
    need an annotation unless ``unannotated_label`` is ``slide`` or the slide is listed in
    ``unannotated`` (``datasets.<name>.unannotated_slides``; else they would silently give no
    tumour patches). Raises :class:`InputError` naming the dataset and the file or key.
    """
    seen: set[str] = set()
    slide_label = cfg["unannotated_label"] == "slide"
    needed = ([] if slide_label else [cfg["unannotated_label"]]) + (
        [cfg["tumour_class"]] if any(r["annotation"] for r in rows) else [])
    for label in needed:
        _known(name, f"config datasets.{name}.tiling", label, class_names)
    for row in rows:
        if row["slide"] in seen:
            raise InputError(STAGE, row["path"], f"dataset {name!r} lists slide {row['slide']!r} twice")
        seen.add(row["slide"])
        _known(name, row["path"], row["label"], class_names)  # exactly: 'Tumor' is no 'tumor'
        if row["annotation"] and not Path(row["annotation"]).is_file():
            raise InputError(STAGE, row["annotation"], f"annotation of slide {row['slide']} "
                             f"(dataset {name!r}) does not exist")
        if (row["label"] == cfg["tumour_class"] and not row["annotation"] and not slide_label
                and row["slide"] not in unannotated):
            raise InputError(STAGE, row["path"], f"dataset {name!r}: slide labelled "
                             f"{row['label']!r} has no annotation, so it would give no tumour "
                             "patches (add its XML, list the slide in datasets.<name>."
                             "unannotated_slides, or set tiling.unannotated_label: slide)")
        wsi.open_slide(row["path"], STAGE).close()


def _known(name: str, where: str, label: str, class_names: list[str]) -> None:
    if label not in class_names:
        raise InputError(STAGE, where, f"dataset {name!r}: label {label!r} is not one of the "
                         f"classes {class_names} (labels are matched exactly)"
                         f"{did_you_mean(label, class_names)}")


def batches(rows: list[dict[str, Any]], slides_per_job: int) -> dict[str, list[dict[str, Any]]]:
    """Split the slide table into jobs of ``slides_per_job`` consecutive slides.

    Returns batch name -> rows, each with its table position as ``index`` (it seeds the
    ``max_patches_per_slide`` sample and is the patch's ``slide`` value). A batch is named after
    its first slide, so with one slide per job adding a slide renames no other job.
    """
    if slides_per_job < 1:
        raise InputError(STAGE, "config tiling.slides_per_job", f"must be >= 1, got {slides_per_job}")
    indexed = [{**row, "index": i} for i, row in enumerate(rows)]
    return {indexed[i]["slide"]: indexed[i:i + slides_per_job]
            for i in range(0, len(rows), slides_per_job)}


def slide_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The tiling settings that can change a slide's patches: all but the operational ones."""
    return {k: v for k, v in cfg.items() if k not in OPERATIONAL}


def read_chunks(path: str | os.PathLike, coords: np.ndarray, geom: wsi.SlideGeometry,
                threads: int, buffer: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Read a slide's patches in chunks of ``len(buffer)`` rows into one reused buffer.

    Yields ``(start, patches)``; ``patches`` is a view of the buffer, valid until the next
    chunk. A job's memory is then the buffer, not the slide's patch count; the buffer defaults
    to ``READ_BYTES``. Tiles on a chunk boundary may be decoded twice.
    """
    if buffer is None:
        buffer = patch_buffer(geom.patch_size, len(coords))
    for start in range(0, len(coords), len(buffer)):
        yield start, wsi.read_patches(path, coords[start:start + len(buffer)], geom,
                                      threads=threads, out=buffer)


def patch_buffer(patch_size: int, n: int) -> np.ndarray:
    """A (rows, patch_size, patch_size, 3) uint8 buffer of at most ``READ_BYTES``, rows a
    multiple of 64 (the store's chunk) and no more than ``n`` are needed."""
    rows = max(64, READ_BYTES // (3 * patch_size ** 2) // 64 * 64)
    return np.empty((max(1, min(rows, n)), patch_size, patch_size, 3), np.uint8)


def store_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The tiling settings recorded in the store: those of every slide (``threads`` and
    ``slides_per_job`` change no patch, so changing them reruns nothing)."""
    return slide_settings(cfg)


def tile_slides(rows: list[dict[str, Any]], cfg: dict[str, Any], out: str | os.PathLike, *,
                class_names: list[str], threads: int) -> Path:
    """Tile the slides of one batch (rows from :func:`batches`) into ``out/<slide>.zarr`` each.

    Slides are done one at a time into ``<out>.partial``; a slide already finished there with the
    same settings, table row and file is kept, so a rerun after a crash resumes. ``out`` appears
    only when every slide is done. A slide without tissue is recorded as skipped (no rows) when
    ``skip_empty`` is set, else it fails the job.
    """
    with Pieces(out) as pieces:
        for row in rows:
            name, key = f"{row['slide']}.zarr", _slide_key(row, cfg, class_names)
            if pieces.done(name, key):
                log.info("%s: already tiled, kept", row["slide"])
                continue
            _tile_one(row, cfg, class_names, pieces.path(name), key, threads)
            pieces.seal(name, key)
        return pieces.finish({f"{row['slide']}.zarr" for row in rows})  # slides left the batch go


def _slide_key(row: dict[str, Any], cfg: dict[str, Any], class_names: list[str]) -> str:
    files = [row["path"]] + ([row["annotation"]] if row["annotation"] else [])
    stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    return settings_hash({"row": row, "cfg": slide_settings(cfg),
                          "classes": class_names, "files": stats})


def _tile_one(row: dict[str, Any], cfg: dict[str, Any], class_names: list[str], target: Path,
              key: str, threads: int) -> None:
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    try:
        writer = StoreWriter(tmp, cfg["patch_size"])
        try:
            coords, labels, geom = plan_slide(row["path"], row["annotation"], row["label"],
                                              row["index"], cfg, class_names, threads=threads)
        except InputError as err:
            if not (cfg.get("skip_empty") and "tissue" in str(err)):
                raise
            log.warning("skipping: %s", err)
            writer.group.attrs.update({"key": key, "skipped": True})
        else:
            n = len(coords)
            for start, patches in read_chunks(row["path"], coords, geom, threads):
                stop = start + len(patches)
                writer.append(patches, coords[start:stop], np.full(len(patches), row["index"]),
                              labels[start:stop], np.full(len(patches), SPLITS.index(row["split"])))
            writer.group.attrs.update({"key": key, "skipped": False, "meta": {
                "level": geom.level, "base_mpp": geom.base_mpp,
                "base_magnification": geom.base_mag, "patches": n, "label": row["label"],
                "centre": row["centre"]}})
            log.info("%s: %d patches (level %d, read %d px)", row["slide"], n, geom.level,
                     geom.read_size)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, target)


def gather(rows: list[dict[str, Any]], slide_dirs: list[str | os.PathLike], cfg: dict[str, Any],
           *, out: str | os.PathLike, class_names: list[str],
           attrs: dict[str, Any] | None = None) -> Path:
    """Concatenate the per-slide stores of every row (found in ``slide_dirs``, the outputs of
    :func:`tile_slides`) in slide-table order into a new patch store at ``out``, atomically."""
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    found = {p.name[:-5]: p for d in slide_dirs for p in Path(d).glob("*.zarr")}
    meta = {"class_names": class_names, "split_names": list(SPLITS),
            "slides": [r["slide"] for r in rows], "source": "wsi",
            "magnification": cfg["magnification"], "patch_size": cfg["patch_size"],
            "stride": cfg["stride"], "tiling": cfg, **(attrs or {})}
    try:
        writer = StoreWriter(partial, cfg["patch_size"], attrs=meta)
        slide_meta, skipped = {}, []
        for row in rows:
            if row["slide"] not in found:
                raise InputError(STAGE, row["path"], "no tiled output for this slide among "
                                 f"{[str(d) for d in slide_dirs]}")
            group = zarr.open_group(str(found[row["slide"]]), mode="r")
            if group.attrs["skipped"]:
                skipped.append(row["slide"])
                continue
            slide_meta[row["slide"]] = group.attrs["meta"]
            for start in range(0, group["patches"].shape[0], GATHER_ROWS):
                stop = start + GATHER_ROWS
                writer.append(*(group[name][start:stop] for name in ("patches", *FIELDS)))
        writer.group.attrs.update({"slide_meta": slide_meta, "skipped_slides": skipped})
        record_channel_stats(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("gathered %d patches from %d slides (%d skipped)", writer.n, len(rows), len(skipped))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)
    return out


def tile_cohort(rows: list[dict[str, Any]], cfg: dict[str, Any], out: str | os.PathLike,
                class_names: list[str], attrs: dict[str, Any] | None = None) -> Path:
    """Tile every slide in ``rows`` and gather them into a new patch store at ``out`` (one
    process; per-slide stores go to ``<out>.slides``, which resumes a crashed run)."""
    out = Path(out)
    slides = out.with_name(out.name + ".slides")
    indexed = [row for batch in batches(rows, 1).values() for row in batch]
    tile_slides(indexed, cfg, slides, class_names=class_names, threads=int(cfg["threads"]))
    gather(rows, [slides], cfg, out=out, class_names=class_names, attrs=attrs)
    shutil.rmtree(slides)
    return out
