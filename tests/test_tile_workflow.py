"""Per-slide tiling jobs and raw-data staleness, through Snakemake on tiny temp workdirs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import planned_jobs, snakemake, tiny_config
from histodistill.slides import cohort, tiling
from histodistill.data.store import PatchStore

pytestmark = pytest.mark.slow
TILING = {"magnification": 10, "patch_size": 32, "stride": 32, "max_patches_per_slide": 40}


def add_datasets(work: Path, **datasets: dict) -> None:
    """Add dataset entries to the workdir's tiny config."""
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg["datasets"].update(datasets)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def c16(root: Path, **extra) -> dict:
    return {"format": "wsi", "layout": "camelyon16", "root": str(root), "classes": ["normal", "tumor"],
            "centre_split": {"normal": 1, "tumor": 1}, "tiling": TILING, **extra}


def rewrite(path: Path) -> None:
    """Replace a file by new contents that read the same (a trailing byte every reader of
    TIFF, XML, CSV and PNG ignores): Snakemake checksums small inputs, so bytes must change."""
    path.write_bytes(path.read_bytes() + b"\n")


@pytest.fixture(scope="module")
def tiled(tmp_path_factory: pytest.TempPathFactory, small_cohort: Path) -> Path:
    """A workdir whose dataset ``c16`` (a real, non-generated root) is tiled, one slide a job."""
    work = tmp_path_factory.mktemp("tilewf")
    shutil.copytree(small_cohort, work / "raw")
    tiny_config(work / "config.yaml")
    add_datasets(work, c16=c16(work / "raw", tiling=TILING | {"slides_per_job": 1}))
    proc = snakemake(work, "--cores", "2", "results/c16/patches.zarr")
    text = proc.stdout + proc.stderr
    assert [text.count(j) for j in ("checkpoint cohort:", "rule tile_slides:", "rule tile:")] == [1, 4, 1]
    return work


def test_gathered_store_equals_one_process_tiling(tiled):
    rows = cohort.read_table(tiled / "results/c16/slides.csv")
    ref = PatchStore(tiling.tile_cohort(rows, _defaults() | TILING,
                                        tiled / "ref.zarr", ["normal", "tumor"]))
    got = PatchStore(tiled / "results/c16/patches.zarr")
    for name in ("coords", "slide", "label", "split"):
        np.testing.assert_array_equal(got.array(name), ref.array(name))
    np.testing.assert_array_equal(got.patches(), ref.patches())
    assert got.group["patches"].chunks == ref.group["patches"].chunks
    for key in ("slides", "slide_meta", "skipped_slides", "channel_mean", "channel_std", "class_names"):
        assert got.attrs[key] == ref.attrs[key], key
    assert sorted(p.name for p in (tiled / "results/c16/tiles").iterdir()) == [
        "normal_001", "test_001", "test_002", "tumor_001"]


def _defaults() -> dict:
    from histodistill import config

    return config.validate({"datasets": {}})["tiling"]


def test_untouched_inputs_rerun_nothing(tiled):
    assert planned_jobs(snakemake(tiled, "-n", "results/c16/patches.zarr")) == {}


def test_replacing_one_slide_reruns_only_its_job_and_the_gather(tiled):
    try:
        rewrite(tiled / "raw/training/tumor/tumor_001.tif")
        proc = snakemake(tiled, "-n", "results/c16/patches.zarr")
        assert planned_jobs(proc) == {"tile_slides": 1, "tile": 1}
        assert "results/c16/tiles/tumor_001" in proc.stdout
        rewrite(tiled / "raw/testing/lesion_annotations/test_002.xml")
        proc = snakemake(tiled, "-n", "results/c16/patches.zarr")
        assert planned_jobs(proc) == {"tile_slides": 2, "tile": 1}
        assert "results/c16/tiles/test_002" in proc.stdout
    finally:
        snakemake(tiled, "--cores", "2", "results/c16/patches.zarr")


def test_tiling_settings_rerun_every_slide_but_threads_rerun_nothing(tiled):
    try:
        add_datasets(tiled, c16=c16(tiled / "raw", tiling=TILING | {"tissue_threshold": 0.6}))
        assert planned_jobs(snakemake(tiled, "-n", "results/c16/patches.zarr")) == {
            "tile_slides": 4, "tile": 1}
        add_datasets(tiled, c16=c16(tiled / "raw", tiling=TILING | {"threads": 1}))
        assert planned_jobs(snakemake(tiled, "-n", "results/c16/patches.zarr")) == {}
    finally:
        add_datasets(tiled, c16=c16(tiled / "raw", tiling=TILING | {"slides_per_job": 1}))


def test_label_table_is_an_input_of_the_cohort(tiled):
    reference = tiled / "raw/testing/reference.csv"
    original = reference.read_bytes()
    try:
        rewrite(reference)
        assert planned_jobs(snakemake(tiled, "-n", "results/c16/patches.zarr"))["cohort"] == 1
    finally:
        reference.write_bytes(original)


def test_changed_label_retiles_only_that_slide(tmp_path, small_cohort):
    shutil.copytree(small_cohort, tmp_path / "raw")
    tiny_config(tmp_path / "config.yaml")
    add_datasets(tmp_path, c16=c16(tmp_path / "raw", tiling=TILING | {"slides_per_job": 2}))
    snakemake(tmp_path, "--cores", "2", "results/c16/patches.zarr")
    reference = tmp_path / "raw/testing/reference.csv"
    reference.write_text(reference.read_text().replace("test_002,Tumor", "test_002,Normal"))
    proc = snakemake(tmp_path, "--cores", "2", "results/c16/patches.zarr")
    text = proc.stdout + proc.stderr
    assert text.count("rule tile_slides:") == 1 and "results/c16/tiles/test_001" in text
    store = PatchStore(tmp_path / "results/c16/patches.zarr")
    assert store.attrs["slide_meta"]["test_002"]["label"] == "normal"


def test_bad_root_fails_at_dag_time_naming_dataset_and_file(tmp_path, small_cohort):
    shutil.copytree(small_cohort, tmp_path / "raw")
    (tmp_path / "raw/training/lesion_annotations/tumor_001.xml").unlink()
    tiny_config(tmp_path / "config.yaml")
    add_datasets(tmp_path, c16=c16(tmp_path / "raw"))
    proc = snakemake(tmp_path, "-n", "results/c16/patches.zarr", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Job stats" not in text
    assert "dataset 'c16': slide labelled 'tumor' has no annotation" in text
    assert "tumor_001.tif" in text
    (tmp_path / "raw/training/tumor/tumor_001.tif").write_bytes(b"not a slide")
    add_datasets(tmp_path, c16=c16(tmp_path / "raw", tiling=TILING | {"unannotated_label": "slide"}))
    proc = snakemake(tmp_path, "-n", "results/c16/patches.zarr", check=False)
    assert proc.returncode != 0
    assert "tumor_001.tif: cannot be read by OpenSlide" in proc.stdout + proc.stderr


def test_demo_cohort_plans_tiling_after_the_checkpoint(tmp_path):
    tiny_config(tmp_path / "config.yaml")
    jobs = planned_jobs(snakemake(tmp_path, "-n", "results/demo/patches.zarr"))
    assert jobs == {"demo_cohort": 1, "cohort": 1, "tile": 1}


def test_ingest_sources_are_inputs(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "raw" / split / cls).mkdir(parents=True)
            for k in range(3):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                    tmp_path / "raw" / split / cls / f"{k}.png")
    np.savez(tmp_path / "tiny.npz", train_images=rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8),
             train_labels=np.array([0, 1] * 3), test_images=rng.integers(0, 255, (2, 16, 16, 3), dtype=np.uint8),
             test_labels=np.array([0, 1]))
    tiny_config(tmp_path / "config.yaml")
    add_datasets(tmp_path, folder={"format": "imagefolder", "root": str(tmp_path / "raw")},
                 tiny={"format": "npz", "root": str(tmp_path), "file": "{root}/tiny.npz"})
    targets = ["results/folder/patches.zarr", "results/tiny/patches.zarr"]
    snakemake(tmp_path, "--cores", "2", *targets)
    assert planned_jobs(snakemake(tmp_path, "-n", *targets)) == {}
    rewrite(tmp_path / "raw/train/a/1.png")
    assert planned_jobs(snakemake(tmp_path, "-n", *targets)) == {"ingest": 1}
    snakemake(tmp_path, "--cores", "2", *targets)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "raw/train/b/new.png")
    assert planned_jobs(snakemake(tmp_path, "-n", *targets)) == {"ingest": 1}
    np.savez(tmp_path / "tiny.npz", **{**np.load(tmp_path / "tiny.npz"), "test_labels": np.array([1, 0])})
    assert planned_jobs(snakemake(tmp_path, "-n", *targets)) == {"ingest": 2}
