"""How networks compute (histodistill.runtime.Compute): bfloat16 autocast and channels_last,
forced on the CPU here. ``auto`` is the float32 path on the CPU; forced on, autocast runs, the
training loops train, and accuracy on the pre-tiled demo stays within the run-to-run spread."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TRAIN, make_toy_store
from histodistill import config, models
from histodistill.data import ingest
from histodistill.data.store import PatchStore
from histodistill.runtime import CHANNELS_LAST, PRECISIONS, Compute, Projection
from histodistill.state import load_state
from histodistill.synth.patches import PatchDemoSpec, make_patch_demo
from histodistill.training import Inputs, TrainConfig, evaluate_arch, predict, tensor_batches, train
from histodistill.trajectories.unroll import Student

AUTO = config.defaults("$defs/compute")
FP32 = {"precision": "fp32", "channels_last": False}
FORCED = {"precision": "bf16", "channels_last": True}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: one thread runs them fastest (no hand-offs between threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _toy(n: int = 32, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(n, 3, size, size, generator=gen) - 1,
                   torch.rand(n, 3, size, size, generator=gen)])
    return x, torch.arange(2).repeat_interleave(n)


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.build("convnet", 2, 16, width=8, norm="batchnorm")


def test_auto_is_off_on_the_cpu_and_on_for_cuda():
    assert AUTO == {"precision": "auto", "channels_last": "auto"}
    schema = config.schema_at("$defs/compute")["properties"]
    assert (schema["precision"]["enum"], schema["channels_last"]["enum"]) == \
        (list(PRECISIONS), list(CHANNELS_LAST))
    assert Compute.of("cpu", AUTO) == Compute("cpu", bf16=False, channels_last=False)
    assert Compute.of("cuda", AUTO) == Compute("cuda", bf16=True, channels_last=True)
    assert Compute.of("cuda", FP32) == Compute("cuda", bf16=False, channels_last=False)
    assert Compute.of("cpu", FORCED) == Compute("cpu", bf16=True, channels_last=True)
    assert Compute.on(_net(), AUTO).device_type == "cpu"
    for bad in ({"precision": "fp16", "channels_last": "auto"}, {"precision": "auto", "channels_last": 1}):
        with pytest.raises(ValueError, match="choose one of"):
            Compute.of("cpu", bad)


def test_forced_bf16_autocasts_convolutions_and_linears_on_the_cpu():
    net, compute = _net(), Compute.of("cpu", FORCED)
    x, y = _toy(4)
    with compute.autocast():
        feats = net.body[0](x)  # the first convolution
        logits = net(compute.inputs(x))
        loss = F.cross_entropy(logits, y)
    assert feats.dtype == torch.bfloat16 and logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32  # autocast keeps the loss in float32
    with Compute.of("cpu", AUTO).autocast():
        assert net(x).dtype == torch.float32  # auto: no autocast on the CPU


def test_channels_last_converts_the_weights_and_the_inputs_in_place():
    net, compute = _net(), Compute.of("cpu", FORCED)
    params = list(net.parameters())
    assert compute.model(net) is net and list(net.parameters()) == params  # the same objects
    convs = [p for p in net.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    x = compute.inputs(torch.rand(2, 3, 16, 16))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert Compute.of("cpu", AUTO).inputs(x) is x
    # an expert (no buffers) trained in channels_last stores the same flat trajectory point
    torch.manual_seed(0)
    net = compute.model(models.build("convnet", 2, 16, width=8, norm="instancenorm"))
    plain = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    assert torch.equal(Student(net).flat(), Student(plain).flat())
    assert torch.equal(Student(plain).flat(), torch.nn.utils.parameters_to_vector(plain.parameters()))


def _trained(compute: dict, sam_rho: float = 0.0) -> tuple[torch.nn.Module, dict, np.ndarray]:
    x, y = _toy()
    gen = torch.Generator().manual_seed(0)
    net, curve = _net(), {}
    cfg = TrainConfig.from_config({**TRAIN, "epochs": 3, "lr": 0.05, "batch": 16, "sam_rho": sam_rho,
                                   "compute": compute})
    train(net, tensor_batches(x, y, 16, gen), cfg, gen, curve=curve)
    prob, _ = predict(net, tensor_batches(x, y, 16, torch.Generator().manual_seed(1))(0),
                      Compute.on(net, cfg.compute))
    return net, curve, prob


def test_auto_on_the_cpu_trains_exactly_as_float32():
    auto, auto_curve, auto_prob = _trained(AUTO)
    fp32, fp32_curve, fp32_prob = _trained(FP32)
    assert auto_curve == fp32_curve and np.array_equal(auto_prob, fp32_prob)
    for (name, a), (_, b) in zip(auto.state_dict().items(), fp32.state_dict().items()):
        assert torch.equal(a, b), name
    _, bf16_curve, _ = _trained(FORCED)
    assert bf16_curve["loss"] != fp32_curve["loss"]  # forced on, the computation does change


@pytest.mark.parametrize("sam_rho", [0.0, 0.05])
def test_forced_bf16_and_channels_last_train_a_few_steps(sam_rho):
    net, curve, prob = _trained(FORCED, sam_rho)
    assert all(np.isfinite(curve["loss"])) and curve["loss"][-1] < curve["loss"][0]
    assert prob.dtype == np.float32 and np.allclose(prob.sum(1), 1, atol=1e-5)
    assert all(p.dtype == torch.float32 for p in net.parameters())  # weights stay float32
    assert net.body[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_generator_trainings_run_under_forced_bf16_and_channels_last(tmp_path: Path):
    from histodistill.generate.autoencoder import train_autoencoder
    from histodistill.generate.generator import train_generator
    from histodistill.generate.histodiffusion import finetune_decoder, train_latent_classifier

    store = make_toy_store(tmp_path / "toy.zarr", n_per_class=8, n_test=2)
    ae = {**config.defaults("generate.autoencoder"), "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1,
          "downsample": 2, "lr": 1e-3, "batch": 4, "steps": 3, "disc_start": 1, "disc_layers": 1,
          "scale_batches": 1, "compute": FORCED}
    run = {"seed": 0, "checkpoint_every": 1000, "cache_mb": 64, "progress": False}
    train_autoencoder(store, tmp_path / "ae.pt", ae, **run)
    gen = {**config.defaults("generate.generator"), "preset": "tiny", "dim": 16, "depth": 2, "heads": 2,
           "steps": 2, "batch": 4, "warmup": 1, "compute": FORCED}
    clf = {**config.defaults("generate.latent_classifier"), "ch": 8, "ch_mult": [1, 2],
           "num_res_blocks": 1, "heads": 2, "steps": 2, "batch": 4, "compute": FORCED}
    ft = {**config.defaults("generate.finetune"), "steps": 2, "batch": 4, "compute": FORCED,
          "aux": {"net": "convnet", "net_kwargs": {"width": 8, "depth": 2}, "steps": 2, "lr": 0.01}}
    states = [train_generator(store, tmp_path / "ae.pt", tmp_path / "g.pt", cfg=gen, mode="cond",
                              **run).history]
    train_latent_classifier(store, tmp_path / "ae.pt", tmp_path / "c.pt", cfg=clf,
                            schedule_cfg=gen["schedule"], **run)
    finetune_decoder(store, tmp_path / "ae.pt", tmp_path / "d.pt", cfg=ft, **run)
    for name in ("ae", "c", "d"):
        states.append(load_state(tmp_path / f"{name}.pt")["history"])
    for history in states:
        assert history and all(np.isfinite(v) for h in history for k, v in h.items() if k != "step")


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> PatchStore:
    """The pre-tiled demo (six 28 px tissue classes), small: 16 training and 24 test patches
    per class."""
    tmp = tmp_path_factory.mktemp("demo_patches")
    spec = PatchDemoSpec.from_config({**config.defaults("demo_patches"), "n_train": 16, "n_val": 0,
                                      "n_test": 24, "seed": 1})
    npz = make_patch_demo(tmp / "demo.npz", spec, progress=False)
    return PatchStore(ingest.ingest_npz(npz, tmp / "patches.zarr", None, {}, None))


def test_bf16_accuracy_on_the_pre_tiled_demo_is_within_the_run_to_run_spread(demo_store):
    """The evaluator (evaluate_arch) trained with bf16 forced and in float32, over the same four
    seeds: the mean accuracies differ by less than float32's run-to-run standard deviation."""
    inputs = Inputs(demo_store, None, False, torch.device("cpu"))
    x, y = (torch.cat(t) for t in zip(*[(xb, yb) for xb, yb, _ in inputs.split("train", 512)]))
    results = {}
    for name, compute in (("fp32", FP32), ("bf16", {**FP32, "precision": "bf16"})):
        cfg = TrainConfig.from_config({**TRAIN, "epochs": 10, "lr": 0.05, "batch": 32,
                                       "schedule": "cosine", "compute": compute})
        results[name] = evaluate_arch("convnet", {"width": 16, "depth": 2, "norm": "instancenorm"},
                                      lambda g: tensor_batches(x, y, 32, g), inputs, 28,
                                      len(demo_store.class_names), cfg, 4, 0, None)["acc"]
    fp32, bf16 = results["fp32"], results["bf16"]
    assert fp32["mean"] > 2 / len(demo_store.class_names)  # it learns (chance: 1/6)
    assert fp32["std"] > 0
    assert abs(bf16["mean"] - fp32["mean"]) <= fp32["std"], results


def test_a_long_training_is_announced_with_the_setting_to_lower(caplog):
    """The projection from the first steps: steps after the first are timed, times the epochs
    and runs to come; over ten minutes it is a warning naming the setting, else a line of info."""
    proj = Projection("cpu", "encoders.<name>.train.epochs", epochs=30, repeats=2, probe=3)
    with caplog.at_level(logging.INFO, logger="histodistill.runtime"):
        for done, elapsed in ((1, 5.0), (2, 7.0), (3, 9.0)):  # 2 s a step after the first
            proj.step(done, 100, elapsed)
        proj.step(4, 100, 11.0)
        proj.epoch(500.0)  # already told: nothing more
    [rec] = caplog.records
    assert rec.levelname == "WARNING" and "~3.3 h" in rec.message  # 2 s x 100 x 30 x 2
    assert "(2 runs of 30 epochs of 100 steps)" in rec.message
    assert rec.message.endswith("see encoders.<name>.train.epochs")
    caplog.clear()
    short = Projection("cpu", "evaluate.train.epochs", epochs=3)
    with caplog.at_level(logging.INFO, logger="histodistill.runtime"):
        short.step(1, None, 1.0)  # an epoch of unknown length: the first epoch is timed
        short.epoch(20.0)
    [rec] = caplog.records
    assert rec.levelname == "INFO" and "~60 s" in rec.message and "see" not in rec.message
