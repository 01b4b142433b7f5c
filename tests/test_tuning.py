"""Settings chosen on the validation split (never on test) and figures over distillation seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from conftest import AUGMENT, TRAIN, make_toy_store, method_settings
from histodistill import config, evaluate, training
from histodistill.metrics import METRICS
from histodistill.config import ConfigError, with_candidate
from histodistill.distill.run import distill
from histodistill.distill.tuning import choose, distill_or_adopt, seed_summary
from histodistill.evaluate import evaluate_candidate, selection_split
from histodistill.data.store import PatchStore
from histodistill.io import InputError

DM = method_settings("dm", net="convnet", net_kwargs={"width": 8, "norm": "none"}, iterations=2,
                     lr_img=1.0, batch_real=8, augment={**AUGMENT, "preset": "dsa"}, checkpoint_every=1)
EVALUATE = {**config.defaults("evaluate"), "archs": ["convnet"], "arch_kwargs": {"convnet": {"width": 8}},
            "runs": 2, "seed": 0, "train": {**TRAIN, "epochs": 3, "batch": 16},
            "augment": {**AUGMENT, "preset": "none"}, "stain_norm": False}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tuning")
    return {"val": make_toy_store(tmp / "val.zarr", n_val=6),
            "noval": make_toy_store(tmp / "noval.zarr"), "tmp": tmp}


def test_no_tuning_code_path_reads_the_test_split(stores, monkeypatch):
    """A candidate is distilled from train and judged on val: the test rows are never read."""
    read = []
    real_iterate = training.iterate
    monkeypatch.setattr(training, "iterate",
                        lambda store, split, *a, **k: read.append(split) or real_iterate(
                            store, split, *a, **k))
    real_indices = PatchStore.indices
    monkeypatch.setattr(PatchStore, "indices",
                        lambda self, split: read.append(split) or real_indices(self, split))
    tmp = stores["tmp"]
    distill("dm", 2, DM, 0, {"zarr": tmp / "c0.zarr", "grid": tmp / "c0.png", "cost": tmp / "c0_cost.json"},
            store_path=stores["val"], cache_mb=64, progress=False)
    record = evaluate_candidate(tmp / "c0.zarr", tmp / "c0_cost.json", store_path=stores["val"],
                                template_path=None, evaluate=EVALUATE, overrides={"lr_img": 1.0},
                                out=tmp / "c0.json")
    assert "test" not in read and "val" in read
    assert record["split"] == "val" and len(record["patch"]["convnet"]["acc"]["runs"]) == 2


@pytest.mark.slow
def test_the_chosen_set_is_adopted_at_its_seed_and_distilled_with_its_settings_at_others(stores):
    """At the candidates' seed the distill rule's set is the chosen candidate's, byte for byte;
    at another seed it is distilled with the chosen overrides; both cost files record the
    choice; an untuned method is distilled with its own settings."""
    tmp = stores["tmp"] / "adopt"
    tmp.mkdir()
    for k, lr in enumerate([1.0, 0.5]):
        distill("dm", 2, {**DM, "lr_img": lr}, 0,
                {"zarr": tmp / f"c{k}.zarr", "grid": tmp / f"c{k}.png", "cost": tmp / f"c{k}_cost.json"},
                store_path=stores["val"], cache_mb=64, progress=False)
    choice = {"choice": 1, "overrides": {"lr_img": 0.5}, "split": "val"}
    (tmp / "choice.json").write_text(json.dumps(choice))

    def run(name, seed, choice_path):
        out = {"zarr": tmp / f"{name}.zarr", "grid": tmp / f"{name}.png",
               "cost": tmp / f"{name}_cost.json"}
        distill_or_adopt("dm", 2, DM, seed, out, choice_path=choice_path,
                         candidate_stem=str(tmp / "c"), tuned_seed=0,
                         store_path=stores["val"], template_path=None, pool_path=None,
                         checkpoint=None, cache_mb=64, progress=False)
        return zarr.open_group(str(out["zarr"]), mode="r"), json.loads(out["cost"].read_text())

    adopted, cost = run("s0", 0, tmp / "choice.json")
    chosen = zarr.open_group(str(tmp / "c1.zarr"), mode="r")
    assert np.array_equal(adopted["images"][:], chosen["images"][:])
    assert cost["tuning"] == choice
    other, cost = run("s1", 1, tmp / "choice.json")
    assert other.attrs["config"]["lr_img"] == 0.5 and other.attrs["seed"] == 1
    assert cost["tuning"] == choice
    untuned, cost = run("plain", 1, None)
    assert untuned.attrs["config"]["lr_img"] == 1.0 and "tuning" not in cost


def test_a_result_holds_both_protocols_and_their_cross_architecture_figures(stores):
    """With both_protocols the result records the method's stain protocol and the other one,
    each with its per-architecture and cross-architecture figures, from the same set."""
    from histodistill.stain import StainTemplate

    tmp = stores["tmp"] / "protocols"
    tmp.mkdir()
    StainTemplate([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]], [1.0, 0.5]).save(tmp / "t.json")
    distill("dm", 2, DM, 0, {"zarr": tmp / "s.zarr", "grid": tmp / "s.png", "cost": tmp / "s_cost.json"},
            store_path=stores["val"], cache_mb=64, progress=False)
    (tmp / "full.json").write_text(json.dumps({"train_time_s": 4.0}))
    cfg = {**EVALUATE, "runs": 1, "both_protocols": True, "extra_archs": ["lenet"]}
    result = evaluate.evaluate_distilled(tmp / "s.zarr", tmp / "s_cost.json", store_path=stores["val"],
                                         template_path=tmp / "t.json",
                                         full={"convnet": tmp / "full.json"}, cfg=cfg, dataset="toy",
                                         out=tmp / "r.json")
    assert result["split"] == "test" and result["stain_norm"] is False
    assert result["other_protocol"]["stain_norm"] is True
    for view in (result, result["other_protocol"]):
        assert set(view["patch"]) == {"convnet", "lenet"}
        assert view["cross_arch"]["excluded"] == "convnet" and view["cross_arch"]["archs"] == ["lenet"]
    assert result["train_time_ratio"]["convnet"] > 0 and set(result["full"]) == {"convnet"}
    assert json.loads((tmp / "r.json").read_text()) == result
    # a study set asks for both protocols too (tuning does not), on val
    record = evaluate_candidate(tmp / "s.zarr", tmp / "s_cost.json", store_path=stores["val"],
                                template_path=tmp / "t.json", evaluate=cfg, overrides={},
                                out=tmp / "c.json")
    assert record["split"] == "val" and record["other_protocol"]["stain_norm"] is True


def test_a_store_without_val_is_refused_not_judged_on_test(stores):
    with pytest.raises(InputError, match=r"\[tune\].*no val split.*never chosen on the test"):
        selection_split(PatchStore(stores["noval"]))
    assert selection_split(PatchStore(stores["val"])) == "val"


def _candidate(tmp, k, acc, split="val", saturated=0.0):
    path = tmp / f"cand{k}.json"
    path.write_text(json.dumps({"overrides": {"lr_img": k}, "split": split,
                                "saturated_fraction": saturated,
                                "patch": {"convnet": {"acc": {"mean": acc, "std": 0.0},
                                                      "auc": {"mean": acc, "std": 0.0}}},
                                "distill": {"seconds": 10.0 + k, "image_updates": 5}}))
    return path


def test_the_best_validation_accuracy_is_chosen_ties_to_the_first(tmp_path):
    files = [_candidate(tmp_path, k, acc) for k, acc in enumerate([0.6, 0.7, 0.7, 0.5])]
    choice = choose(files, tmp_path / "choice.json", 0.02)
    assert choice["choice"] == 1 and choice["overrides"] == {"lr_img": 1}
    assert choice["split"] == "val" and len(choice["candidates"]) == 4
    assert json.loads((tmp_path / "choice.json").read_text()) == choice
    with pytest.raises(ValueError, match="test split"):
        choose([_candidate(tmp_path, 9, 0.9, "test")], tmp_path / "bad.json", 0.02)


def test_a_saturated_candidate_is_chosen_only_when_every_candidate_is(tmp_path):
    files = [_candidate(tmp_path, 0, 0.6), _candidate(tmp_path, 1, 0.9, saturated=0.085),
             _candidate(tmp_path, 2, 0.7, saturated=0.02)]
    choice = choose(files, tmp_path / "choice.json", 0.02)
    assert choice["choice"] == 2 and choice["within_saturation_limit"]  # 0.9 is over the limit
    assert [c["saturated_fraction"] for c in choice["candidates"]] == [0.0, 0.085, 0.02]
    over = choose(files[1:2], tmp_path / "over.json", 0.01)
    assert over["choice"] == 0 and not over["within_saturation_limit"]


def test_a_candidate_key_the_method_lacks_is_named():
    assert with_candidate({"lr_img": 1.0, "iterations": 5}, {"lr_img": 0.1}, "dm")["lr_img"] == 0.1
    with pytest.raises(ConfigError, match=r"tuning.candidates.dm.*'lr_image'"):
        with_candidate({"lr_img": 1.0}, {"lr_image": 0.1}, "dm")


def test_seed_summary_is_the_mean_and_std_over_seeds_of_each_seeds_mean(tmp_path):
    files = []
    for seed, acc in enumerate([0.60, 0.64, 0.62]):
        patch = {"convnet": {m: {"mean": acc, "std": 0.01, "runs": [acc]}
                             for m in METRICS}}
        path = tmp_path / f"s{seed}.json"
        path.write_text(json.dumps({"method": "dm", "ipc": 10, "dataset": "toy", "patch": patch,
                                    "stain_norm": False, "saturated_fraction": 0.01 * seed,
                                    "distill": {"seconds": 100.0, "image_updates": 50},
                                    "cross_arch": {m: {"mean": acc - 0.1, "std": 0.0}
                                                   for m in METRICS}}))
        files.append(path)
    out = seed_summary(files, [0, 1, 2], tmp_path / "seeds.json")
    acc = out["patch"]["convnet"]["acc"]
    assert acc["mean"] == pytest.approx(0.62) and acc["std"] == pytest.approx(np.std([.6, .64, .62]))
    assert acc["seeds"] == [0.60, 0.64, 0.62] and out["seeds"] == [0, 1, 2]
    assert out["cross_arch"]["acc"]["mean"] == pytest.approx(0.52)
    assert out["distill"]["seconds"]["mean"] == 100.0


def test_the_budget_fills_the_seconds_with_each_methods_measured_cost(stores):
    """Counts = budget / measured seconds per iteration, written in the profile's keys."""
    import yaml

    from histodistill.distill import budget

    args = {"store_path": stores["val"], "template_path": None, "pool_path": None, "seed": 0,
            "cache_mb": 64}
    cost = budget.seconds_per_iteration("dm", DM, 2, args, probe=2)
    assert cost > 0
    calibration = {"methods": {
        "histodd": {"key": "outer_loop", "ipc": {10: {"seconds_per_iteration": 30.0,
                                                      "iterations": 30}}},
        "dm": {"key": "iterations", "ipc": {2: {"seconds_per_iteration": 0.5,
                                                "iterations": 1800},
                                            10: {"seconds_per_iteration": 1.0,
                                                 "iterations": 900}}}}}
    block = yaml.safe_load(budget.profile_block(calibration))
    assert block == {"histodd": {"outer_loop": {10: 30}}, "dm": {"iterations": {2: 1800, 10: 900}}}


def test_the_probe_times_iterations_across_the_run_not_only_its_start(stores):
    """PTM's iterations grow dearer with its end point: the probe spreads its iterations over
    the run, so a cost rising from 0 to 18 ms is measured near its mean, not near 0."""
    import time

    from histodistill.distill import budget
    from histodistill.distill.base import METHODS, Distiller, register

    @register("rising_cost")
    class Rising(Distiller):
        def init_state(self) -> None:
            self.iterations = 10

        def step(self, it: int) -> float:
            time.sleep(0.002 * it)
            return 0.0

    try:
        args = {"store_path": stores["val"], "template_path": None, "pool_path": None, "seed": 0,
                "cache_mb": 64}
        cost = budget.seconds_per_iteration("rising_cost", {}, 2, args, probe=5)
        assert 0.007 < cost < 0.02  # points 0, 2, 4, 6, 8: a mean of 8 ms
    finally:
        METHODS.pop("rising_cost")


def test_a_diverged_run_is_refused_and_a_diverged_candidate_never_chosen(stores, tmp_path):
    """A loss or images that stop being finite (plain SGD at too high a rate): the pipeline's
    distill refuses the set and writes nothing; a tuning candidate stops there, records the
    iteration, and the tuner passes it over even when its (meaningless) accuracy is the
    highest."""
    import math
    from histodistill.distill.base import METHODS, register
    from histodistill.distill.dm import DM as DMMethod

    @register("blows_up")
    class BlowsUp(DMMethod):
        steps = 0

        def step(self, it: int) -> float:
            BlowsUp.steps += 1
            loss = super().step(it)
            if it == 1:
                with torch.no_grad():
                    self.images[0, 0, 0, 0] = float("nan")
            return loss

    @register("nan_loss")
    class NanLoss(DMMethod):
        def step(self, it: int) -> float:
            loss = super().step(it)
            return math.nan if it == 0 else loss

    try:
        with pytest.raises(FloatingPointError, match=r"nan_loss ipc 2.*iteration 0"):
            distill("nan_loss", 2, DM, 0,
                    {"zarr": tmp_path / "n.zarr", "grid": tmp_path / "n.png", "cost": tmp_path / "n.json"},
                    store_path=stores["val"], cache_mb=64, progress=False)
        out = tmp_path / "d.zarr"
        with pytest.raises(FloatingPointError, match=r"blows_up ipc 2.*iteration 1"):
            distill("blows_up", 2, DM, 0, {"zarr": out, "grid": tmp_path / "d.png", "cost": tmp_path / "d.json"},
                    store_path=stores["val"], cache_mb=64, progress=False)
        assert not out.exists() and not (tmp_path / "d.json").exists()
        BlowsUp.steps = 0
        distill("blows_up", 2, {**DM, "iterations": 5},
                0, {"zarr": out, "grid": tmp_path / "d.png", "cost": tmp_path / "d.json"},
                store_path=stores["val"], cache_mb=64, progress=False, keep_diverged=True)
        assert json.loads((tmp_path / "d.json").read_text())["diverged_at"] == 1
        assert BlowsUp.steps == 2  # iterations 0 and 1 of 5: none spent after the divergence
    finally:
        METHODS.pop("blows_up")
        METHODS.pop("nan_loss")
    files = [_candidate(tmp_path, k, acc) for k, acc in enumerate([0.6, 0.9])]
    record = json.loads(files[1].read_text())
    record["distill"]["diverged_at"] = 3
    files[1].write_text(json.dumps(record))
    choice = choose(files, tmp_path / "choice.json", 0.02)
    assert choice["choice"] == 0 and choice["candidates"][1]["diverged_at"] == 3
    with pytest.raises(ValueError, match="every candidate diverged"):
        choose([files[1]], tmp_path / "none.json", 0.02)


def test_a_choice_applies_its_overrides_except_those_the_use_sets_itself():
    from histodistill.distill.tuning import apply_choice

    cfg = {"lr_img": 1.0, "iterations": 50, "unit_grad": True}
    choice = {"overrides": {"lr_img": 0.5, "iterations": 9}}
    assert apply_choice(cfg, None, "dm") == cfg
    assert apply_choice(cfg, choice, "dm") == {**cfg, "lr_img": 0.5, "iterations": 9}
    # per-slide overrides (mil.distill.<method>) win over the chosen candidate's
    assert apply_choice(cfg, choice, "dm", keep={"iterations": 5}) == {**cfg, "lr_img": 0.5}


def test_budget_measurements_of_one_comparison_accumulate_in_one_file(tmp_path):
    from histodistill.distill.budget import merged

    def measured(method, ipc, budget=900.0):
        return {"dataset": "pcam", "budget_s": budget, "methods": {method: {
            "key": "iterations", "ipc": {ipc: {"seconds_per_iteration": 1.0, "iterations": 900}}}}}

    path = tmp_path / "budget.json"
    assert merged(path, measured("dm", 10)) == measured("dm", 10)  # nothing there yet
    path.write_text(json.dumps(measured("dm", 10)))
    both = merged(path, measured("dm", 2))
    assert set(both["methods"]["dm"]["ipc"]) == {"2", "10"}
    path.write_text(json.dumps(both))
    assert set(merged(path, measured("histodd", 2))["methods"]) == {"dm", "histodd"}
    assert merged(path, measured("dm", 2, budget=600.0)) == measured("dm", 2, budget=600.0)
