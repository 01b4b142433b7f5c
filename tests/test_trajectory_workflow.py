"""What reruns what around the expert buffer: Snakemake dry runs over a recorded state whose demo
target is mtt and ptm at ipc 2 (one shared buffer)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TRIGGERS, edited_config, planned, planned_jobs, recorded_state, snakemake


pytestmark = pytest.mark.slow
BELOW_BUFFER = {"buffer_experts": 1, "distill": 2, "evaluate": 2, "privacy_audit": 2, "result": 2,
                "demo": 1}


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return recorded_state(tmp_path_factory.mktemp("trajectories"),
                          targets={"methods": ["mtt", "ptm"], "ipc": [2]})


def test_mtt_and_ptm_share_one_buffer(state):
    proc = snakemake(state, "-n", "--forceall", "demo", *TRIGGERS)
    jobs = planned_jobs(proc)
    assert jobs["buffer_experts"] == 1 and jobs["distill"] == 2
    assert "results/demo/experts/convnet.h5" in proc.stdout


def test_editing_ptm_settings_reruns_ptm_and_its_evaluation_only(state):
    def edit(cfg: dict) -> None:
        cfg["datasets"]["demo"]["distill"]["methods"]["ptm"]["beta_overlap"] = 0.5
    with edited_config(state, edit):
        proc = snakemake(state, "-n", "demo", *TRIGGERS)
        assert planned_jobs(proc) == {"distill": 1, "evaluate": 1, "privacy_audit": 1, "result": 1,
                                           "demo": 1}
        assert "output: results/demo/ptm_ipc2.json" in proc.stdout
        assert "output: results/demo/mtt_ipc2.json" not in proc.stdout
    with edited_config(state, lambda c: c["distill"]["methods"]["mtt"].update(lr_lr={2: 1e-6})):
        assert planned(state) == {"distill": 1, "evaluate": 1, "privacy_audit": 1, "result": 1,
                                           "demo": 1}


def test_editing_the_trajectory_settings_rebuilds_the_buffer_and_what_uses_it(state):
    with edited_config(state, lambda c: c["datasets"]["demo"]["trajectories"].update(epochs=3)):
        assert planned(state) == BELOW_BUFFER
    with edited_config(state, lambda c: c["trajectories"].update(dtype="float16")):
        assert planned(state) == BELOW_BUFFER
    # the shuffle buffer's size is a resource, and distillation's seed does not reach the experts
    assert planned(state, "--config", "trajectories={cache_mb: 64}") == {}
    assert planned(state, "--config", "distill={seed: 3}") == {
        "distill": 2, "evaluate": 2, "privacy_audit": 2, "result": 2, "demo": 1}


def failure(work: Path, *args: str) -> str:
    """The output of a snakemake run in ``work`` that must fail."""
    proc = snakemake(work, *args, check=False)
    assert proc.returncode != 0
    return proc.stdout + proc.stderr


def test_experts_of_another_network_name_the_key(state):
    text = failure(state, "-n", "results/demo/experts/lenet.h5")
    assert "trajectories.net is 'convnet'; set it to 'lenet'" in text


def test_a_bad_trajectory_key_is_one_message(state):
    text = failure(state, "-n", "demo", "--config", "trajectories={epoch: 3}")
    assert "config key 'trajectories.epoch' is not recognised" in text
    text = failure(state, "-n", "demo", "--config",
                   "datasets={demo: {distill: {methods: {ptm: {beta1: 2}}}}}")
    assert "'datasets.demo.distill.methods.ptm.beta1' is not recognised" in text


def test_ptm_with_its_own_experts_gets_its_own_buffer_and_mtt_keeps_the_shared_one(state):
    """distill.methods.ptm.trajectories: PTM's experts trained only to its end point (more of
    them, optionally flat), in experts/convnet_ptm.h5; the shared buffer and mtt untouched."""
    def own(cfg: dict) -> None:
        cfg["datasets"]["demo"]["distill"]["methods"]["ptm"]["trajectories"] = {
            "experts": 4, "epochs": 2, "train": {"sam_rho": 0.05}}

    with edited_config(state, own):
        proc = snakemake(state, "-n", "demo", *TRIGGERS)
    assert planned_jobs(proc) == {"buffer_experts": 1, "distill": 1, "evaluate": 1,
                                  "privacy_audit": 1, "result": 1, "demo": 1}
    assert "output: results/demo/experts/convnet_ptm.h5" in proc.stdout
    assert "output: results/demo/mtt_ipc2.json" not in proc.stdout

    def short(cfg: dict) -> None:  # experts that stop before PTM's last end point (2)
        cfg["datasets"]["demo"]["distill"]["methods"]["ptm"]["trajectories"] = {"epochs": 1}

    with edited_config(state, short):
        text = failure(state, "-n", "demo")
    assert ("'distill.methods.ptm.trajectories.epochs' is 1 for dataset 'demo', below its "
            "end_epoch 2") in text
