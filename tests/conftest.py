"""Shared fixtures: small synthetic slides, the real CMU slide and the real H&E target image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from histodistill.synth import DemoSpec, make_cohort

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


SMALL = DemoSpec(n_train=2, n_test=2, width=1024, height=768, levels=3, seed=3)


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
    from test_workflow import snakemake, tiny_config

    work = tmp_path_factory.mktemp("wf")
    tiny_config(work / "config.yaml")
    snakemake(work, "--cores", "2", "demo")
    return work
