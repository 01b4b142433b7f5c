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
