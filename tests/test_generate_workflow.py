"""What reruns what in the generator stages: Snakemake's dry run over a recorded state of the
demo's generator targets (every output touched, as tests/test_staleness.py records the demo)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import edited_config, edited_module, recorded_state, planned as plan
from histodistill.config import merge

pytestmark = pytest.mark.slow
TARGETS = ("results/demo/generate/uvit_quality.json",
           "results/demo/generate/histodiffusion_quality.json")


def planned(work: Path, *args: str) -> dict[str, int]:
    return plan(work, *args, goals=TARGETS)


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return recorded_state(tmp_path_factory.mktemp("generate_staleness"), *TARGETS)


def edit(patch: dict):  # noqa: ANN201
    """A config edit deep-merging ``patch`` into the demo's generate overrides."""

    def apply(cfg: dict) -> None:
        demo = cfg["datasets"]["demo"]
        demo["generate"] = merge(demo.get("generate", {}), patch)

    return apply


def test_sampling_settings_rerun_only_their_generator(state: Path) -> None:
    with edited_config(state, edit({"sampling": {"uvit": {"cfg_scale": 1.0}}})):
        assert planned(state) == {"sample_synthetic": 1, "generator_quality": 1}
    with edited_config(state, edit({"quality": {"k": 5}})):
        assert planned(state) == {"generator_quality": 2}


def test_generator_settings_rerun_the_diffusion_models_not_the_autoencoder(state: Path) -> None:
    with edited_config(state, edit({"generator": {"lr": 1e-3}})):
        assert planned(state) == {"train_generator": 2, "sample_synthetic": 2, "generator_quality": 2}
    # the noise schedule is also the latent classifier's
    with edited_config(state, edit({"generator": {"schedule": {"kind": "cosine"}}})):
        assert planned(state) == {"train_generator": 2, "train_latent_classifier": 1,
                                  "sample_synthetic": 2, "generator_quality": 2}
    with edited_config(state, edit({"finetune": {"lambda_ce": 1.0}})):
        assert planned(state) == {"finetune_decoder": 1, "sample_synthetic": 1, "generator_quality": 1}
    with edited_config(state, edit({"autoencoder": {"kl_weight": 1e-5}})):
        assert planned(state) == {"train_autoencoder": 1, "train_generator": 2,
                                  "train_latent_classifier": 1, "finetune_decoder": 1,
                                  "sample_synthetic": 2, "generator_quality": 2}


def test_operational_knobs_and_unrelated_code_rerun_nothing(state: Path) -> None:
    assert planned(state, "--config", "generate={checkpoint_every: 7, cache_mb: 64}") == {}
    with edited_module(state, "generate/quality.py"):
        assert planned(state) == {"generator_quality": 2}
    with edited_module(state, "evaluate.py"):  # no generator stage imports the evaluator
        assert planned(state) == {}
    with edited_module(state, "generate/uvit.py"):  # the stages that build or load a U-ViT
        assert planned(state) == {"train_generator": 2, "sample_synthetic": 2,
                                  "generator_quality": 2}
