"""Shared fixtures (small synthetic slides, the real CMU slide, the real H&E target image, toy
patch stores, the tiny demo workflow built once) and the workflow-test harness: one Snakemake
runner, the tiny config, dry-run plans and recorded up-to-date states."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml

from histodistill import config as hdconfig
from histodistill.synth.cohort import DemoSpec, make_cohort

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT / "resources" / "real"


def _real(name: str) -> Path:
    path = REAL / name
    if not path.exists():
        pytest.fail(f"{path} missing: run `make resources` (make test does it)")
    return path


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    """Real Aperio SVS crop of OpenSlide's CMU-1 (20x, 240 px JPEG tiles)."""
    return _real("cmu_small_region.svs")


@pytest.fixture(scope="session")
def target_image() -> np.ndarray:
    """Real 1000x1000 H&E image (RGB uint8)."""
    from PIL import Image

    return np.asarray(Image.open(_real("target_image.png")).convert("RGB"))


# Complete settings sections for tests that build one by hand, as the library takes them
# validated: {**AUGMENT, "preset": "none"}, {**TRAIN, "epochs": 2}
AUGMENT = hdconfig.defaults("$defs/augment")
TRAIN = hdconfig.defaults("$defs/train")
ENCODER = hdconfig.defaults("$defs/encoder")
DATASET = hdconfig.defaults("datasets.*")  # a datasets.<name> entry
# the stain section's Macenko settings (what stain.fit and choose_template take)
MACENKO = {k: v for k, v in hdconfig.defaults("stain").items() if k != "split"}


def method_settings(method: str, **settings) -> dict:
    """A distillation method's settings: the schema's defaults (``distill.methods.<method>``)
    with ``settings`` (a mapping given replaces the whole setting, e.g. ``augment``)."""
    return {**hdconfig.defaults(f"distill.methods.{method}"), **settings}


SMALL = DemoSpec.from_config({**hdconfig.defaults("demo"), "n_train": 2, "n_test": 2, "width": 1024,
                              "height": 768, "levels": 3, "seed": 3})


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-slide Camelyon16-layout cohort of 1024x768 slides (2 train, 2 test)."""
    return make_cohort(tmp_path_factory.mktemp("cohort") / "cohort", SMALL, progress=False)


@pytest.fixture(scope="session")
def tumour_slide(small_cohort: Path) -> Path:
    return small_cohort / "training" / "tumor" / "tumor_001.tif"


def make_toy_store(path: Path, n_per_class: int = 24, size: int = 16, seed: int = 0,
                   n_test: int = 8, n_val: int = 0) -> Path:
    """A two-class patch store (dark, fine texture vs bright, coarse) with train, val (when
    ``n_val``) and test rows, classes interleaved, and its channel statistics recorded, as the
    pipeline builds stores."""
    from histodistill.data.stream import record_channel_stats
    from histodistill.data.store import SPLITS, StoreWriter

    rng = np.random.default_rng(seed)
    writer = StoreWriter(path, size, chunk=8, attrs={"class_names": ["dark", "bright"],
                                                       "split_names": list(SPLITS), "slides": [],
                                                       "patch_size": size})
    n = n_per_class + n_val + n_test
    x0 = 90 + rng.integers(0, 25, (n, 3, size, size))
    x1 = 150 + rng.integers(0, 75, (n, 3, size, size))
    x = np.stack([x0, x1], 1).reshape(2 * n, 3, size, size).astype(np.uint8)  # classes alternate
    y = np.tile([0, 1], n)
    row = np.arange(2 * n)
    split = np.where(row < 2 * n_per_class, 0, np.where(row < 2 * (n_per_class + n_val), 1, 2))
    writer.append(x, np.full((2 * n, 2), -1), np.full(2 * n, -1), y, split)
    record_channel_stats(path)
    return path


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo target of the workflow on test_workflow's tiny config, built once per session:
    the workflow and report tests share it (each build costs minutes of job start-ups)."""
    work = tmp_path_factory.mktemp("wf")
    tiny_config(work / "config.yaml")
    snakemake(work, "--cores", "2", "demo")
    return work


# --- The workflow-test harness: one runner, the tiny config, dry-run plans, recorded states ---

TRIGGERS = ("--rerun-triggers", "mtime", "params", "input", "code")


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Snakemake on ``workdir``: in it, with its own workflow and library, when it is a copy
    (:func:`workflow_copy`); else the repository's workflow, run from the repository root (so
    ``--profile slurm`` resolves) on ``workdir`` and its config.yaml (unless ``args`` name
    config files). ``check``: a failure
    raises, with the end of its output."""
    if (workdir / "Snakefile").exists():
        cmd, cwd = [sys.executable, "-m", "snakemake", *args], workdir
        env = {**os.environ, "PYTHONPATH": str(workdir)}
    else:
        # targets first: an option of several values (--configfile) would take them in
        config = [] if "--configfile" in args else ["--configfile", str(workdir / "config.yaml")]
        # after "--" everything is a target: the harness's options go before it
        cut = args.index("--") if "--" in args else len(args)
        cmd = [sys.executable, "-m", "snakemake", *args[:cut], "--snakefile", str(ROOT / "Snakefile"),
               "--directory", str(workdir), *config, *args[cut:]]
        cwd, env = ROOT, {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
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


NET = {"width": 8, "norm": "none"}
TINY_DISTILL = {
    "pool": {"net": "convnet", "net_kwargs": NET, "size": 2, "train": {"epochs": 1},
             "save_epochs": [1]},
    "methods": {
        "histodd": {"outer_loop": 2, "inner_loop": 2, "batch_real": 16, "batch_net": 16,
                    "n_data": 32},
        "dc": {"net_kwargs": NET, "iterations": 2, "outer_loop": 2, "inner_loop": 2, "batch_real": 16},
        "dsa": {"net_kwargs": NET, "iterations": 2, "outer_loop": 2, "inner_loop": 2, "batch_real": 16},
        "dm": {"net_kwargs": NET, "iterations": 3, "batch_real": 16},
        "herding": {"net": "convnet", "net_kwargs": NET, "train": {"epochs": 1}},
        "forgetting": {"net": "convnet", "net_kwargs": NET, "train": {"epochs": 2}},
        "mtt": {"iterations": 2, "syn_steps": 3, "max_start_epoch": 1, "expert_epochs": 1},
        "ptm": {"iterations": 2, "syn_steps": 1, "end_epoch": 2, "retrain": 1},
    },
}
TINY_TRAJECTORIES = {"experts": 2, "epochs": 2, "net_kwargs": {"width": 8},
                     "train": {"batch": 64}}
TINY_EVALUATE = {"archs": ["convnet"], "arch_kwargs": {"convnet": {"width": 8, "norm": "batchnorm"}},
                 "runs": 2, "train": {"epochs": 3}, "full": {"epochs": 1}}
TINY_ENCODERS = {"supervised": {"net": "convnet", "net_kwargs": {"width": 8, "norm": "batchnorm"},
                                "train": {"epochs": 1}}}
TINY_MIL = {  # two of the four models (each is unit-tested; CI time)
    "encoder": "supervised",  # the privacy audit's encoder: one encoder to train
    "models": ["clam_sb", "dsmil"],
    "runs": 1,
    "distill": {"histodd": {"outer_loop": 1, "inner_loop": 1, "n_data": 16},
                "dm": {"iterations": 2}},
    "settings": {"clam_sb": {"epochs": 2}, "clam_mb": {"epochs": 2}, "dsmil": {"epochs": 2},
                 "transmil": {"epochs": 2, "dim": 16, "landmarks": 4}},
    "transfer": {"patch_arch": "convnet", "pretrain": {"epochs": 1}, "finetune": {"epochs": 1},
                 "runs": 1},
}


def tiny_config(path: Path, **edits: dict) -> None:
    """The shipped config (config.yaml with the overlays of configs/ merged over it, as
    `--configfile` merges them, every section filled with the schema's defaults) in one file,
    the demo shrunk to 4 small slides and a few iterations; ``edits`` are merged into top-level
    sections."""
    cfg = hdconfig.load(hdconfig.CONFIG, *hdconfig.overlays("demo", "demo_patches", "pcam"))
    cfg["demo"].update(n_train=2, n_test=2, width=1024, height=768, levels=3)
    demo = cfg["datasets"]["demo"]
    demo["centre_split"] = {"normal": 1, "tumor": 1}
    demo["tiling"].update(patch_size=32, stride=32, max_patches_per_slide=60)
    demo["distill"], demo["evaluate"] = TINY_DISTILL, TINY_EVALUATE
    demo["encoders"], demo["mil"] = TINY_ENCODERS, TINY_MIL
    demo["trajectories"] = TINY_TRAJECTORIES
    for section, values in edits.items():
        cfg[section] = hdconfig.merge(cfg[section], values)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def workflow_copy(work: Path) -> Path:
    """A copy of the workflow and the library in ``work`` (a test may edit either there);
    :func:`snakemake` runs it with that library first on the path."""
    for name in ("Snakefile", "workflow", "scripts", "histodistill", "envs"):
        copy_ = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy_(ROOT / name, work / name)
    (work / "profiles").symlink_to("workflow/profiles")
    return work


def planned(work: Path, *args: str, goals: tuple[str, ...] = ("demo",)) -> dict[str, int]:
    """Jobs a dry run of ``goals`` (default: the demo target) plans: rule -> count."""
    return planned_jobs(snakemake(work, "-n", *goals, *args, *TRIGGERS))


def recorded_state(work: Path, *goals: str, **edits: dict) -> Path:
    """A copy of the workflow and library in ``work`` with the tiny config (``tiny_config`` with
    ``edits``), every output of the target rules or files ``goals`` (default: ``demo``) created
    empty and recorded as built and up to date with ``snakemake --touch``."""
    goals = goals or ("demo",)
    workflow_copy(work)
    tiny_config(work / "config.yaml", **edits)
    slide_table(work)
    for line in snakemake(work, "--summary", *goals).stdout.splitlines()[1:]:
        out = work / line.split("\t")[0]
        if out.suffix in ("", ".zarr"):  # directory outputs
            out.mkdir(parents=True, exist_ok=True)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.touch()
    snakemake(work, "--touch", "--forceall", "--cores", "1", *goals)
    assert planned(work, goals=goals) == {}
    return work


def slide_table(work: Path) -> None:
    """The tiny demo's slide table (the cohort checkpoint's output) and empty slide files, so
    the jobs planned from the table (tiling, per-slide distillation) are part of the state."""
    cohort = work / "results/demo/cohort"
    rows = ["slide,path,label,split,centre,annotation"]
    for name, label, split in (("normal_001", "normal", "train"), ("tumor_001", "tumor", "train"),
                               ("test_001", "normal", "test"), ("test_002", "tumor", "test")):
        folder = f"training/{label}" if split == "train" else "testing/images"
        slide = cohort / folder / f"{name}.tif"
        slide.parent.mkdir(parents=True, exist_ok=True)
        slide.touch()
        rows.append(f"{name},{slide.relative_to(work)},{label},{split},{-1 if split == 'test' else 0},")
    (work / "results/demo/slides.csv").write_text("\n".join(rows) + "\n")


@contextmanager
def edited_config(work: Path, edit) -> Iterator[None]:  # noqa: ANN001
    """The state's config.yaml changed by ``edit(cfg)`` for the duration of the block."""
    path = work / "config.yaml"
    original = path.read_text()
    cfg = yaml.safe_load(original)
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    try:
        yield
    finally:
        path.write_text(original)


@contextmanager
def edited_module(work: Path, module: str) -> Iterator[None]:
    """A comment appended to one library module of the state for the duration of the block."""
    path = work / "histodistill" / module
    original = path.read_text()
    path.write_text(original + "\n# edited\n")
    try:
        yield
    finally:
        path.write_text(original)


