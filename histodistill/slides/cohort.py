"""Slide tables: turn a dataset's on-disk layout into one row per slide.

Each row: ``slide`` (name), ``path``, ``label``, ``split`` (train/val/test), ``centre`` (int,
-1 when unknown) and ``annotation`` (XML path or empty). Layouts: ``camelyon16`` (the official
release) and ``table`` (a CSV of slide names and labels, e.g. TCGA IDH).
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from histodistill.data.store import SPLITS
from histodistill.io import (InputError, atomic_path, confine, dataset_root, did_you_mean,
                             read_csv)

STAGE = "cohort"
COLUMNS = ("slide", "path", "label", "split", "centre", "annotation")
SLIDE_EXTS = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms")


def build_table(name: str, dataset: dict[str, Any]) -> list[dict[str, Any]]:
    """Slide table for a WSI dataset, validated (every slide and annotation exists, labels
    known), so that a bad cohort fails here, before any tiling job is queued."""
    root = dataset_root(name, dataset, STAGE)
    layout = dataset["layout"]
    rows = _camelyon16(root, dataset) if layout == "camelyon16" else _table(root, dataset)
    if not rows:
        raise InputError(STAGE, root, f"no slides found for dataset {name!r} (layout {layout})")
    rows = _assign_val(rows, float(dataset["val_fraction"]), int(dataset["seed"]))
    for row in rows:
        if not Path(row["path"]).is_file():
            raise InputError(STAGE, row["path"], "slide listed for the dataset does not exist")
        if row["annotation"] and not Path(row["annotation"]).is_file():
            raise InputError(STAGE, row["annotation"],
                             f"annotation of slide {row['slide']} does not exist")
    return rows


def _slide_number(name: str) -> int:
    match = re.search(r"(\d+)$", name)
    return int(match.group(1)) if match else -1


def _camelyon16(root: Path, dataset: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the official layout (a tumour slide without its XML gets an empty annotation,
    which :func:`histodistill.slides.tiling.check_cohort` refuses unless opted in)."""
    centre_split = dataset["centre_split"]
    rows = []
    for label in ("normal", "tumor"):
        for path in sorted((root / "training" / label).glob("*.tif")):
            ann = root / "training" / "lesion_annotations" / f"{path.stem}.xml"
            rows.append({"slide": path.stem, "path": str(path), "label": label, "split": "train",
                         "centre": int(_slide_number(path.stem) > int(centre_split[label])),
                         "annotation": str(ann) if ann.exists() else ""})
    reference = root / "testing" / "reference.csv"
    test_images = sorted((root / "testing" / "images").glob("*.tif"))
    if test_images:
        labels = _reference_labels(reference)
        for path in test_images:
            if path.stem.lower() not in labels:
                raise InputError(STAGE, reference, f"no label for test slide {path.stem}")
            ann = root / "testing" / "lesion_annotations" / f"{path.stem}.xml"
            rows.append({"slide": path.stem, "path": str(path), "label": labels[path.stem.lower()],
                         "split": "test", "centre": -1,
                         "annotation": str(ann) if ann.exists() else ""})
    return rows


def _reference_labels(path: Path) -> dict[str, str]:
    """Camelyon16 ``reference.csv``: ``name,Tumor|Normal[,...]``, with or without a header."""
    if not path.is_file():
        raise InputError(STAGE, path, "Camelyon16 test labels (testing/reference.csv) missing")
    labels = {}
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if len(row) >= 2 and row[1].strip().lower() in ("tumor", "normal"):
                labels[row[0].strip().lower()] = row[1].strip().lower()
    return labels


def _table(root: Path, dataset: dict[str, Any]) -> list[dict[str, Any]]:
    table = Path(str(dataset["table"]).format(root=root))
    if not table.is_file():
        raise InputError(STAGE, table, "slide-label CSV does not exist (datasets.<name>.table)")
    slide_col = dataset["slide_column"]
    label_col = dataset["label_column"]
    slide_dir = root / dataset["slide_dir"]
    records = read_csv(table, STAGE, [slide_col, label_col], [slide_col, label_col])
    rows = []
    roots = [root, *dataset["extra_roots"]]
    seen: dict[Path, int] = {}  # each slide file's first line: one file under two names would
    for line, rec in records:  # put the same tissue in two splits
        where = f"{table}, line {line}"
        name = rec[slide_col].strip()
        path = Path(rec["path"]) if rec.get("path") else _find_slide(slide_dir, name)
        # a slide name such as ../../x or an absolute name is confined like a path column
        full = confine(path, roots, STAGE, where, "slide path" if rec.get("path") else
                       f"slide {name!r}: file")
        if full in seen:
            raise InputError(STAGE, where, f"slide file {full} is already listed on line "
                             f"{seen[full]}: one slide file per row")
        seen[full] = line
        annotation = rec.get("annotation", "") or ""
        if annotation:
            confine(annotation, roots, STAGE, where, "annotation")
        split = rec.get("split", "") or ""
        if split not in ("", *SPLITS):
            raise InputError(STAGE, where, f"split {split!r} is not one of {list(SPLITS)} (or "
                             f"empty: a seeded split){did_you_mean(split, list(SPLITS))}")
        centre = rec.get("centre") or "-1"
        if not re.fullmatch(r"-?\d+", centre.strip()):
            raise InputError(STAGE, where, f"centre {centre!r} is not an integer (the centre's "
                             "number, or -1 for unknown)")
        rows.append({"slide": Path(name).stem, "path": str(path), "label": rec[label_col],
                     "split": split, "centre": int(centre), "annotation": annotation})
    if any(not r["split"] for r in rows):
        rows = _split_by_slide(rows, float(dataset["test_fraction"]), int(dataset["seed"]))
    return rows


def _find_slide(slide_dir: Path, name: str) -> Path:
    if Path(name).suffix.lower() in SLIDE_EXTS:
        return slide_dir / name
    for ext in SLIDE_EXTS:
        if (slide_dir / f"{name}{ext}").exists():
            return slide_dir / f"{name}{ext}"
    return slide_dir / name


def _split_by_slide(rows: list[dict], fraction: float, seed: int, split: str = "test",
                    among: str = "") -> list[dict]:
    """Seeded split of slides stratified by label: ``fraction`` of each label's slides go to
    ``split`` (only rows whose split is ``among``; the rest default to train)."""
    rng = np.random.default_rng(seed)
    for label in sorted({r["label"] for r in rows}):
        pool = [r for r in rows if r["label"] == label and r["split"] in (among, "")]
        chosen = set(rng.permutation(len(pool))[: int(round(fraction * len(pool)))].tolist())
        for i, r in enumerate(pool):
            r["split"] = split if i in chosen else (r["split"] or "train")
    return rows


def _assign_val(rows: list[dict], fraction: float, seed: int) -> list[dict]:
    if fraction <= 0:
        return rows
    return _split_by_slide(rows, fraction, seed + 1, split="val", among="train")


def write_table(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write a slide table CSV atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_table(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a slide table written by :func:`write_table`."""
    with open(path, newline="") as f:
        return [{**r, "centre": int(r["centre"])} for r in csv.DictReader(f)]
