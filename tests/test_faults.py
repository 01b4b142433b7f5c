"""Faults: each resumable stage killed with SIGKILL at seeded random points of its work, then
rerun, ends identical to an uninterrupted run, with no temporary left behind; a full disk
(a file-size limit) is one line naming the output, with nothing partial."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from PIL import Image

from conftest import AUGMENT, TRAIN, make_toy_store, method_settings
from histodistill import config

pytestmark = pytest.mark.slow  # outside the fast tier (make test-all)

TESTS = Path(__file__).parent

# One stage per call, in a child process: argv = stage, JSON arguments. It prints READY when
# its work starts, so the parent's kill lands inside the work, not in the imports.
CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[3])
stage, a = sys.argv[1], json.loads(sys.argv[2])
from histodistill import config
DATASET = config.defaults("datasets.*")
if stage == "ingest":
    from histodistill.data.ingest import ingest_dataset
    print("READY", flush=True)
    ingest_dataset("d", {**DATASET, "format": "imagefolder", "root": a["root"]}, a["out"])
elif stage == "tile":
    from histodistill.slides import cohort, tiling
    rows = cohort.build_table("s", {**DATASET, "format": "wsi", "layout": "camelyon16", "root": a["root"]})
    rows = [r for b in tiling.batches(rows, 1).values() for r in b]
    print("READY", flush=True)
    tiling.tile_slides(rows, a["cfg"], a["out"], class_names=["normal", "tumor"], threads=1)
elif stage == "buffer":
    from histodistill.trajectories.buffer import buffer_experts
    print("READY", flush=True)
    buffer_experts(a["store"], a["out"], a["cfg"], seed=0, cache_mb=64, progress=False)
elif stage == "distill":
    from histodistill.distill.run import distill
    print("READY", flush=True)
    distill("dm", 2, a["cfg"], 0,
            {"zarr": a["out"], "grid": a["out"] + ".png", "cost": a["out"] + ".json"},
            store_path=a["store"], checkpoint=a["out"] + ".ckpt", cache_mb=64, progress=False)
elif stage == "full_train":
    from histodistill.evaluate import full_train
    print("READY", flush=True)
    full_train(a["store"], None, "convnet", cfg=a["cfg"], out=a["out"], checkpoint=a["out"] + ".ckpt")
elif stage == "evaluate":  # a distilled set (random real patches, made first) trained on, tested
    from histodistill.distill.run import distill
    from histodistill.evaluate import evaluate_distilled
    made = {"zarr": a["out"] + ".set.zarr", "grid": a["out"] + ".set.png", "cost": a["out"] + ".set.json"}
    distill("random", 2, {}, 0, made, store_path=a["store"], cache_mb=64, progress=False)
    print("READY", flush=True)
    evaluate_distilled(made["zarr"], made["cost"], store_path=a["store"], template_path=None, full={},
                       cfg=a["cfg"], dataset="d", out=a["out"])
"""

NET = {"width": 8, "norm": "none"}
STAGES = {
    "buffer": {"experts": 3, "epochs": 3, "net": "convnet", "net_kwargs": NET,
               "train": {**TRAIN, "lr": 0.01, "momentum": 0, "weight_decay": 0, "batch": 16,
                         "schedule": "constant"}, "augment": {**AUGMENT, "preset": "dsa"},
               "dtype": "float32"},
    "distill": method_settings("dm", net="convnet", net_kwargs=NET, iterations=40, lr_img=1.0,
                               batch_real=8, augment={**AUGMENT, "preset": "dsa"}, checkpoint_every=1),
    "full_train": {**config.defaults("evaluate"), "archs": ["convnet"], "arch_kwargs": {"convnet": NET},
                   "runs": 1, "seed": 0, "full": {**TRAIN, "epochs": 30, "batch": 16, "lr": 0.01},
                   "augment": {**AUGMENT, "preset": "dsa"}, "stain_norm": False},
}
STAGES["evaluate"] = {**STAGES["full_train"], "runs": 6,
                      "train": {**TRAIN, "epochs": 60, "batch": 16, "lr": 0.01}}


def run_child(stage: str, args: dict, kill_after: float | None = None) -> float:
    """Run ``stage`` and return the seconds of its work (after READY); with ``kill_after``,
    SIGKILL it that many seconds into its work instead (a resumed run may finish first: then
    -1 is returned, else the seconds)."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, stage, json.dumps(args), str(TESTS)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=TESTS.parent)
    assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
    start = time.perf_counter()
    if kill_after is not None:
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    if kill_after is not None and proc.returncode == 0:
        return -1.0  # it finished before the kill
    assert proc.returncode == (-signal.SIGKILL if kill_after is not None else 0), err
    return time.perf_counter() - start


def temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.endswith((".tmp", ".partial")) or ".tmp" in p.name)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, small_cohort):
    work = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(0)
    for split, n in (("train", 160), ("test", 40)):
        for cls in ("a", "b"):
            (work / "images" / split / cls).mkdir(parents=True)
            for k in range(n):
                Image.fromarray(rng.integers(0, 256, (24, 24, 3), np.uint8)).save(
                    work / "images" / split / cls / f"{k}.png")
    return {"work": work, "images": work / "images", "cohort": small_cohort,
            "store": make_toy_store(work / "toy.zarr", n_per_class=48)}


def stage_args(stage: str, inputs: dict, out: Path) -> dict:
    if stage == "ingest":
        return {"root": str(inputs["images"]), "out": str(out)}
    if stage == "tile":
        cfg = config.validate({"datasets": {}})["tiling"] | {
            "magnification": 10, "patch_size": 32, "stride": 32, "max_patches_per_slide": 0}
        return {"root": str(inputs["cohort"]), "cfg": cfg, "out": str(out)}
    return {"store": str(inputs["store"]), "cfg": STAGES[stage], "out": str(out)}


def result_of(stage: str, out: Path):
    """What an uninterrupted and a resumed run must agree on."""
    if stage in ("ingest", "distill"):
        group = zarr.open_group(str(out), mode="r")
        names = ["patches", "label", "split"] if stage == "ingest" else ["images", "labels"]
        return [group[n][:] for n in names]
    if stage == "tile":
        return [zarr.open_group(str(p), mode="r")["patches"][:] for p in sorted(out.glob("*.zarr"))]
    if stage == "buffer":
        with h5py.File(out) as f:
            return [f["params"][:]]
    result = json.loads(out.read_text())
    if stage == "evaluate":
        return [np.array(result["patch"]["convnet"]["acc"]["runs"])]
    return [np.array(result["acc"]["runs"] if "runs" in result["acc"] else result["acc"])]


@pytest.mark.parametrize("stage", ["ingest", "tile", "buffer", "distill", "full_train", "evaluate"])
def test_a_stage_killed_at_random_points_resumes_to_the_uninterrupted_result(inputs, stage):
    work = inputs["work"] / stage
    work.mkdir()
    ext = {"buffer": ".h5", "full_train": ".json", "evaluate": ".json"}.get(stage, ".zarr")
    reference = work / f"reference{ext}"
    duration = run_child(stage, stage_args(stage, inputs, reference))
    expected = result_of(stage, reference)
    rng = np.random.default_rng(sum(map(ord, stage)))
    out = work / "killed" / f"out{ext}"
    out.parent.mkdir()
    killed = [run_child(stage, stage_args(stage, inputs, out),  # each in what is left of it
                        kill_after=float(rng.uniform(0.1, high)) * duration) >= 0
              for high in (0.5, 0.9, 0.9)]  # the first well inside the work, whatever the load
    assert killed[0]  # the first kill landed inside the work
    run_child(stage, stage_args(stage, inputs, out))
    for a, b in zip(result_of(stage, out), expected, strict=True):
        np.testing.assert_array_equal(a, b)
    assert temporaries(out.parent) == []


FULL_DISK = r"""
import resource, sys
sys.path.insert(0, sys.argv[3])
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
from histodistill import config
from histodistill.data.ingest import ingest_dataset
from histodistill.logs import rule_logging
with rule_logging(sys.argv[2] + ".log"):
    ingest_dataset("d", {**config.defaults("datasets.*"), "format": "imagefolder", "root": sys.argv[1]},
                   sys.argv[2])
"""


def test_ingest_on_a_full_disk_is_one_line_and_leaves_no_partial_store(inputs, tmp_path):
    out = tmp_path / "p.zarr"
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(inputs["images"]), str(out),
                           str(TESTS)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("histodistill error: [write] ")
    assert "file too large" in lines[0] and str(tmp_path) in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.zarr.log"]
