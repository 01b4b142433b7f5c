"""What reruns what in the selection and latent-distillation stages: Snakemake's dry run over a
recorded state of the demo's targets (every output touched, as tests/test_staleness.py does)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import edited_config, edited_module, recorded_state, planned as plan
from histodistill.config import merge

pytestmark = pytest.mark.slow
TARGETS = tuple(f"results/demo/{m}_ipc10.json" for m in ("infodist", "centroid", "synrandom", "glad", "slfd")
                ) + ("results/demo/augment_centroid.json",)
GENERATOR = {"train_autoencoder", "train_generator", "finetune_decoder", "train_latent_classifier",
             "sample_synthetic", "train_encoder"}


def planned(work: Path, *args: str) -> dict[str, int]:
    return plan(work, *args, goals=TARGETS)


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return recorded_state(tmp_path_factory.mktemp("select_staleness"), *TARGETS)


def edit(section: str, patch: dict):  # noqa: ANN201
    """A config edit deep-merging ``patch`` into the demo's overrides of ``section``."""

    def apply(cfg: dict) -> None:
        demo = cfg["datasets"]["demo"]
        demo[section] = merge(demo.get(section, {}), patch)

    return apply


def test_selection_settings_rerun_selection_and_evaluation_not_the_generator(state: Path) -> None:
    with edited_config(state, edit("select", {"methods": {"infodist": {"eta": 0.002}}})):
        assert planned(state) == {"select": 1, "evaluate": 1, "privacy_audit": 1, "result": 1}
    with edited_config(state, edit("select", {"augment_study": {"runs": 2}})):
        assert planned(state) == {"augment_study": 1}
    # another pool (built already: the real patches): the centroid selection and its study rerun
    with edited_config(state, edit("select", {"methods": {"centroid": {"source": "real"}}})):
        assert planned(state) == {"select": 1, "evaluate": 1, "privacy_audit": 1, "result": 1,
                                  "augment_study": 1}


def test_latent_method_and_cross_arch_settings_rerun_only_their_methods(state: Path) -> None:
    with edited_config(state, edit("distill", {"methods": {"slfd": {"rank": 3}}})):
        assert planned(state) == {"distill": 1, "evaluate": 1, "privacy_audit": 1, "result": 1}
    with edited_config(state, edit("evaluate", {"cross_arch": {"archs": ["convnet", "lenet"]}})):
        assert planned(state) == {"evaluate": 2, "result": 2}  # glad and slfd only


def test_selection_code_reruns_selection_not_the_generator(state: Path) -> None:
    with edited_module(state, "select/infodist.py"):
        jobs = planned(state)
        assert jobs == {"select": 3, "evaluate": 3, "privacy_audit": 3, "result": 3, "augment_study": 1}
        assert not GENERATOR & set(jobs)
