"""Raw-data inputs known at DAG time: label tables, listings rewritten only on change."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from conftest import DATASET
from histodistill.slides import cohort, sources
from histodistill.io import InputError


def test_listing_is_rewritten_only_when_its_text_changes(tmp_path):
    path = tmp_path / "sources" / "x.txt"
    sources.write_if_changed(path, "a\n")
    before = path.stat().st_mtime_ns
    sources.write_if_changed(path, "a\n")
    assert path.stat().st_mtime_ns == before
    sources.write_if_changed(path, "b\n")
    assert path.read_text() == "b\n"


def test_a_dry_run_leaves_the_listing_alone(tmp_path):
    path = tmp_path / "sources" / "x.txt"
    assert sources.listing_input(path, "a\n", dry_run=False) == str(path)
    before = path.stat().st_mtime_ns
    assert sources.listing_input(path, "a\n", dry_run=True) == str(path)  # unchanged: itself
    changed = sources.listing_input(path, "b\n", dry_run=True)
    assert changed != str(path) and open(changed).read() == "b\n"
    assert path.read_text() == "a\n" and path.stat().st_mtime_ns == before
    assert not sources.listing_input(tmp_path / "new" / "y.txt", "c\n", dry_run=True).startswith(str(tmp_path))
    assert not (tmp_path / "new").exists()
    again = sources.listing_input(path, "c\n", dry_run=True)  # the next dry run: the same copy,
    assert again == changed and open(again).read() == "c\n"  # rewritten, not a new file each time
    assert os.stat(again).st_mtime_ns >= os.stat(changed).st_mtime_ns
    os.remove(again)


def test_cohort_tables_and_listing(small_cohort, tmp_path):
    ds = {**DATASET, "format": "wsi", "layout": "camelyon16", "root": str(small_cohort)}
    assert sources.cohort_tables("c16", ds) == [str(small_cohort / "testing/reference.csv")]
    rows = cohort.build_table("c16", ds)
    listing = sources.cohort_listing(rows)
    assert listing.count("\n") == 4 and "tumor_001.xml" in listing
    table = {**DATASET, "format": "wsi", "layout": "table", "root": str(tmp_path), "table": "{root}/labels.csv"}
    assert sources.cohort_tables("t", table) == [str(tmp_path / "labels.csv")]
    with pytest.raises(InputError, match="datasets.t.root: is not set"):
        sources.cohort_tables("t", {**table, "root": None})


def test_ingest_listing_follows_every_image(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for k in range(2):
            Image.fromarray(np.full((4, 4, 3), k, np.uint8)).save(tmp_path / cls / f"{k}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = {**DATASET, "format": "imagefolder", "root": str(tmp_path)}
    files, listing = sources.ingest_inputs("f", ds)
    assert files == [] and listing.count("\n") == 4 and "notes.txt" not in listing
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a" / "1.png")
    assert sources.ingest_inputs("f", ds)[1] != listing  # a replaced image changes the listing
    npz = {**DATASET, "format": "npz", "root": str(tmp_path), "file": "{root}/x.npz"}
    assert sources.ingest_inputs("n", npz) == ([str(tmp_path / "x.npz")], None)
    (tmp_path / "train.csv").write_text("image,label\n0.png,a\n")
    csv_ds = {**DATASET, "format": "csv", "root": str(tmp_path), "csv": {"train": "{root}/train.csv"},
              "image_dir": "{label}"}
    files, listing = sources.ingest_inputs("c", csv_ds)
    assert files == [str(tmp_path / "train.csv")] and listing.startswith(f"{tmp_path / 'a' / '0.png'}\t")
