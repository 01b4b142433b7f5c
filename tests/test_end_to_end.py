"""The fast tier's one end-to-end run: a tiny ImageFolder dataset through Snakemake to a result
file (ingest, stain template, a coreset, the full-data bound, evaluation, encoder, privacy
audit, result), then a dry run that finds nothing to do; dry runs write nothing under
results/ and still see a new image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from conftest import TINY_ENCODERS, TINY_EVALUATE, planned_jobs, snakemake, tiny_config


def test_a_tiny_dataset_reaches_a_result_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        for cls, level in (("dark", 60), ("bright", 190)):
            folder = tmp_path / "raw" / split / cls
            folder.mkdir(parents=True)
            for k in range(n):
                pixels = np.clip(rng.normal(level, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{k}.png")
    tiny_config(tmp_path / "config.yaml")
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    cfg["datasets"]["tiny"] = {
        "format": "imagefolder", "root": str(tmp_path / "raw"), "classes": ["dark", "bright"],
        "patch_size": 16, "evaluate": TINY_EVALUATE, "encoders": TINY_ENCODERS}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    target = "results/tiny/random_ipc2.json"
    assert planned_jobs(snakemake(tmp_path, "-n", target))["ingest"] == 1
    assert not (tmp_path / "results").exists()  # a dry run writes nothing under results/
    snakemake(tmp_path, "--cores", "2", target)
    result = json.loads((tmp_path / target).read_text())
    assert result["method"] == "random" and result["ipc"] == 2 and result["dataset"] == "tiny"
    assert len(result["patch"]["convnet"]["acc"]["runs"]) == TINY_EVALUATE["runs"]
    assert 0 <= result["patch"]["convnet"]["acc"]["mean"] <= 1
    assert result["privacy"]["memorised"] == 1.0  # a coreset: its images are real patches
    assert planned_jobs(snakemake(tmp_path, "-n", target)) == {}
    # a new image: the dry run plans the ingest again and leaves the recorded listing alone
    listing = (tmp_path / "results/tiny/sources/ingest.txt").read_text()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "raw/train/dark/new.png")
    assert planned_jobs(snakemake(tmp_path, "-n", target))["ingest"] == 1
    assert (tmp_path / "results/tiny/sources/ingest.txt").read_text() == listing
