"""Raw data as rule inputs: the files a cohort or ingest job reads, known at DAG time.

Snakemake reruns a job when an input changes, so the label tables a job reads are inputs
directly. File sets that can hold thousands of files (a cohort's slide and annotation names, an
ImageFolder tree) are summarised in a listing file instead: one line per file, rewritten only
when its text changes, so its mtime moves exactly when a file is added, removed or (for image
patches, by size or mtime) replaced. Listing thousands of files costs milliseconds.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from histodistill.data.ingest import IMAGE_EXTS, csv_items
from histodistill.io import atomic_path, dataset_root


def write_if_changed(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` to ``path`` unless it already holds exactly that; return the path."""
    path = Path(path)
    if not path.is_file() or path.read_text() != text:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return str(path)


def listing_input(path: str | os.PathLike, text: str, dry_run: bool) -> str:
    """The listing input of a job: ``path``, rewritten when ``text`` changed (see
    :func:`write_if_changed`). A dry run writes nothing under results/: when the listing would
    change, it gets a fresh copy in the system's temporary folder instead, newer than every
    output, so the dry run still plans the jobs that read it (one file per listing, named by
    its path and rewritten by the next dry run, so dry runs do not pile files up there)."""
    path = Path(path)
    if path.is_file() and path.read_text() == text:
        return str(path)
    if not dry_run:
        return write_if_changed(path, text)
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    copy = Path(tempfile.gettempdir()) / f"histodistill-dryrun-{path.stem}-{key}.txt"
    with atomic_path(copy) as tmp:  # always written: its mtime must be newer than every output
        tmp.write_text(text)
    return str(copy)


def cohort_tables(name: str, dataset: dict[str, Any]) -> list[str]:
    """The label tables the cohort rule reads for a real WSI root (``labels.csv``-style table,
    or Camelyon16's ``testing/reference.csv`` when test images exist)."""
    root = dataset_root(name, dataset, "cohort")
    if dataset["layout"] == "camelyon16":
        reference = root / "testing" / "reference.csv"
        return [str(reference)] if any((root / "testing" / "images").glob("*.tif")) else []
    return [str(dataset["table"]).format(root=root)]


def cohort_listing(rows: list[dict[str, Any]]) -> str:
    """Slide and annotation file names of a slide table, one per line: the cohort rule reruns
    when a slide or annotation appears or disappears (contents are the tiling jobs' inputs)."""
    return "".join(f"{r['slide']}\t{r['path']}\t{r['annotation']}\n" for r in rows)


def ingest_inputs(name: str, dataset: dict[str, Any]) -> tuple[list[str], str | None]:
    """Files an ingest job reads: (direct inputs, listing text or None).

    ``npz``: the file. ``csv``: the label CSVs, plus a listing of the images they name.
    ``imagefolder``: a listing of every image under the root. Listing lines hold path, size and
    mtime, so replacing one image reruns the ingest.
    """
    if dataset.get("synthetic"):
        return [str(dataset["file"]).format(root=dataset["root"])], None
    root = dataset_root(name, dataset, "ingest")
    fmt = dataset["format"]
    if fmt == "npz":
        return [str(dataset["file"]).format(root=root)], None
    if fmt == "csv":
        tables = [str(rel).format(root=root) for rel in dataset["csv"].values()]
        files = sorted(p for p, _, _ in csv_items(root, dataset)[0])
    else:
        tables = []
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    return tables, "".join(_stat_line(p) for p in files)


def _stat_line(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return f"{path}\tmissing\n"  # the ingest job reports it, naming the file
    return f"{path}\t{st.st_size}\t{st.st_mtime_ns}\n"
