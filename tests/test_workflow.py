"""The Snakemake workflow end to end on a tiny demo config: outputs, reruns, profiles, errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from histodistill.store import PatchStore
from histodistill.summary import summarise

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run snakemake from the repo root (so `--profile slurm` resolves) on ``workdir``."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
           "--directory", str(workdir), "--configfile", str(workdir / "config.yaml"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def planned_jobs(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> count from a dry run's 'Job stats' table (empty when nothing is to be done)."""
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def tiny_config(path: Path, **edits: dict) -> None:
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    cfg["demo"].update(n_train=2, n_test=2, width=1024, height=768, levels=3)
    cfg["datasets"]["demo"]["centre_split"] = {"normal": 1, "tumor": 1}
    cfg["datasets"]["demo"]["tiling"].update(patch_size=32, stride=32, max_patches_per_slide=60)
    for section, values in edits.items():
        cfg[section].update(values)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wf")
    tiny_config(work / "config.yaml")
    snakemake(work, "--cores", "2", "demo")
    return work


def test_demo_target_builds_every_stage(built):
    store = PatchStore(built / "results/demo/patches.zarr")
    assert len(store) > 0 and store.attrs["class_names"] == ["normal", "tumor"]
    template = json.loads((built / "results/demo/stain/template.json").read_text())
    assert len(template["stain_matrix"]) == 2 and template["split"] == "train"
    assert (built / "results/demo/stain/template.png").stat().st_size > 0
    assert "patches" in (built / "logs/tile/demo.log").read_text()
    assert (built / "benchmarks/tile/demo.tsv").exists()
    assert planned_jobs(snakemake(built, "-n", "demo")) == {}
    text = summarise(built / "results/demo")
    assert f"{len(store)} patches of 32 px" in text and "template patch" in text


def test_editing_the_stain_section_reruns_only_the_stain_stage(built):
    tiny_config(built / "config.yaml", stain={"beta": 0.2})
    try:
        assert planned_jobs(snakemake(built, "-n", "demo")) == {"stain_template": 1, "demo": 1}
        tiny_config(built / "config.yaml", tiling={"tissue_threshold": 0.6})
        assert planned_jobs(snakemake(built, "-n", "demo")) == {"tile": 1, "stain_template": 1, "demo": 1}
    finally:
        tiny_config(built / "config.yaml")


def test_slurm_profile_dry_runs_from_the_repo_root(built):
    proc = snakemake(built, "--profile", "slurm", "-n", "--forceall", "demo")
    text = proc.stdout + proc.stderr
    assert "Using profiles slurm and workflow specific profile profiles/default" in text
    assert re.search(r"rule tile:.*?mem_mb=16000.*?runtime=480", text, re.S)  # per-rule resources
    assert planned_jobs(proc)["tile"] == 1


def test_bad_config_key_fails_with_one_clear_message(tmp_path):
    tiny_config(tmp_path / "config.yaml", tiling={"magnifcation": 5})
    proc = snakemake(tmp_path, "-n", "demo", check=False)
    assert proc.returncode != 0
    assert "config key 'tiling.magnifcation' is not recognised" in proc.stdout + proc.stderr


def test_missing_dataset_root_names_the_key(tmp_path):
    tiny_config(tmp_path / "config.yaml")
    proc = snakemake(tmp_path, "-n", "results/camelyon16/stain/template.json", check=False)
    assert proc.returncode != 0
    assert "datasets.camelyon16.root: is not set" in proc.stdout + proc.stderr
