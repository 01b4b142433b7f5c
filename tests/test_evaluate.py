"""Metrics against scikit-learn, the InfoDist boundary loss, the training loop and the
evaluation inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, recall_score, roc_auc_score

from conftest import AUGMENT, MACENKO, TRAIN, make_toy_store
from histodistill import models
from histodistill.augment import Augment, AugmentConfig
from histodistill.data.real import RealData
from histodistill.runtime import Compute
from histodistill.metrics import metrics, saturated_fraction, summarise_runs
from histodistill.select.boundary import boundary_loss, boundary_term
from histodistill.training import Inputs, TrainConfig, predict, tensor_batches, train
from histodistill.stain import fit
from histodistill.data.store import PatchStore


def test_binary_metrics_match_sklearn_with_ties():
    y = np.array([0, 0, 1, 1, 1, 0, 1, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.4, 0.9, 0.7, 0.2, 0.6])
    prob = np.stack([1 - p1, p1], 1)
    got = metrics(y, prob)
    pred = prob.argmax(1)
    assert got["acc"] == pytest.approx(accuracy_score(y, pred))
    assert got["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert got["auc"] == pytest.approx(roc_auc_score(y, p1))
    assert got["sensitivity"] == pytest.approx(recall_score(y, pred, pos_label=1))
    assert got["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    logits = rng.normal(size=(200, 4)) + np.eye(4)[y] * 1.5
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    got = metrics(y, prob)
    pred = prob.argmax(1)
    assert got["acc"] == pytest.approx(accuracy_score(y, pred))
    assert got["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert got["auc"] == pytest.approx(roc_auc_score(y, prob, multi_class="ovr", average="macro"))
    assert got["sensitivity"] == pytest.approx(recall_score(y, pred, average="macro"))
    spec = [recall_score(y != c, pred != c) for c in range(4)]  # specificity: negatives' recall
    assert got["specificity"] == pytest.approx(np.mean(spec))


def test_boundary_loss_known_answer():
    # class 1 probabilities 0.9, 0.6, 0.3 for positives; 0.5, 0.2 for negatives
    p = torch.tensor([0.9, 0.6, 0.3, 0.5, 0.2])
    logits = torch.stack([torch.log(1 - p), torch.log(p)], 1)
    y = torch.tensor([1, 1, 1, 0, 0])
    # b_p is the last of the top ceil(B * rho) positives.
    # Class 1: B=3, top 2 -> b_p = 0.6, b_n = 0.5; positives below b_p: 0.3 -> 0.3;
    # negatives above b_n - tau = 0.4: 0.5 -> 0.1.
    # Class 0 (p0 = 1 - p): positives 0.5, 0.8, top 1 -> b_p = 0.8; 0.5 -> 0.3;
    # negatives 0.1, 0.4, 0.7 above b_n - tau = 0.6: 0.7 -> 0.1.
    loss = boundary_loss(logits, y, rho=0.5, tau=0.1)
    assert loss.item() == pytest.approx(0.3 + 0.1 + 0.3 + 0.1, abs=1e-5)


@pytest.mark.slow
def test_training_learns_a_separable_toy_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(32, 3, 16, 16, generator=gen) - 1,
                   torch.rand(32, 3, 16, 16, generator=gen)])
    y = torch.arange(2).repeat_interleave(32)
    torch.manual_seed(0)
    net = models.build("convnet", 2, 16, width=8, norm="batchnorm")
    cfg = TrainConfig.from_config({**TRAIN, "epochs": 15, "lr": 0.05, "batch": 16})
    boundary = boundary_term({"weight": 1.0, "rho": 0.5, "tau": 0.1})
    seen, curve = [], {}
    times = train(net, tensor_batches(x, y, 16, gen), cfg, gen, curve=curve, extra_loss=boundary,
                  on_epoch=lambda e, rows, correct: seen.append((sorted(rows.tolist()), correct.float().mean())))
    assert len(times) == 15 and len(seen) == 15 and seen[-1][1] == 1.0
    # the curve's accuracy is the share classified correctly when presented, as on_epoch sees it
    assert curve["acc"] == pytest.approx([float(acc) for _, acc in seen])
    assert len(curve["loss"]) == 15 and curve["loss"][-1] < curve["loss"][0]
    assert seen[0][0] == list(range(64))  # every row once per epoch
    prob, labels = predict(net, tensor_batches(x, y, 16, gen)(0), Compute.on(net, cfg.compute))
    assert metrics(labels, prob)["acc"] == 1.0


def test_training_augments_each_image_with_its_own_parameters(monkeypatch):
    sizes = []
    sample = Augment.sample
    monkeypatch.setattr(Augment, "sample", lambda self, gen, n=1: (sizes.append(n), sample(self, gen, n))[1])
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 3, 16, 16), torch.arange(2).repeat(10)
    net = models.build("convnet", 2, 16, width=8, norm="batchnorm")
    train(net, tensor_batches(x, y, 8, gen), TrainConfig.from_config({**TRAIN, "epochs": 2, "batch": 8}),
          gen, Augment(AugmentConfig.from_config({**AUGMENT, "preset": "dsa"})))
    assert sizes == [8, 8, 4] * 2  # one parameter draw per image of every batch


def test_evaluation_inputs_are_normalised_and_optionally_stain_normalised(tmp_path, target_image):
    store = PatchStore(make_toy_store(tmp_path / "p.zarr"))
    inputs = Inputs(store, None, False, torch.device("cpu"))
    x = torch.cat([xb for xb, _, _ in inputs.split("train", 16)])
    assert x.mean((0, 2, 3)).abs().max() < 1e-4 and (x.std((0, 2, 3)) - 1).abs().max() < 1e-2
    template = fit(target_image[:256, :256], **MACENKO)
    stained = Inputs(store, template, True, torch.device("cpu"))
    pixels = torch.from_numpy(target_image[:16, :16].copy()).permute(2, 0, 1)[None]
    expect = stained.stats.normalise(stained.stain(pixels.float() / 255))
    torch.testing.assert_close(stained(pixels), expect)
    assert not torch.allclose(stained(pixels), inputs(pixels))
    with pytest.raises(ValueError, match="needs the dataset's stain template"):
        Inputs(store, None, True, torch.device("cpu"))


def test_streamed_batches_and_training_do_not_depend_on_prefetch(tmp_path, target_image):
    """Reading ahead in a worker thread changes where batches are made, not what they are: the
    same seeds give bit-identical batches and trained weights with and without it."""
    store = PatchStore(make_toy_store(tmp_path / "p.zarr"))
    template = fit(target_image[:256, :256], **MACENKO)
    cpu = torch.device("cpu")

    def run(depth: int) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        inputs = Inputs(store, template, True, cpu, buffer_mb=0.01, prefetch=depth)
        real = RealData(store, "train", 1, 0, cpu, prefetch=depth)
        got = [t for b in inputs.split("train", 10, seed=3) for t in b]
        got += [t for b in real.epoch(7, seed=5) for t in b]
        got += [t for b in inputs.split("test", 4) for t in b]
        torch.manual_seed(0)
        net = models.build("convnet", 2, 16, width=8, norm="batchnorm")
        gen = torch.Generator().manual_seed(0)
        train(net, inputs.split_batches("train", 10, 1),
              TrainConfig.from_config({**TRAIN, "epochs": 2, "batch": 10}), gen,
              Augment(AugmentConfig.from_config({**AUGMENT, "preset": "dsa"})))
        return got, net.state_dict()

    (ahead, net_ahead), (inline, net_inline) = run(2), run(0)
    assert len(ahead) == len(inline) > 30
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(ahead, inline))
    assert all(torch.equal(net_ahead[k], net_inline[k]) for k in net_inline)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streamed_batches_on_cuda_match_the_cpu_ones(tmp_path):
    """On CUDA the worker pins host batches and the loop copies them asynchronously."""
    store = PatchStore(make_toy_store(tmp_path / "p.zarr"))
    on_cpu = list(Inputs(store, None, False, torch.device("cpu")).split("train", 10, seed=3))
    on_gpu = list(Inputs(store, None, False, torch.device("cuda")).split("train", 10, seed=3))
    assert len(on_gpu) == len(on_cpu)
    for (x, y, r), (xg, yg, rg) in zip(on_cpu, on_gpu):
        assert xg.is_cuda and yg.is_cuda and not rg.is_cuda
        torch.testing.assert_close(xg.cpu(), x)
        assert torch.equal(yg.cpu(), y) and torch.equal(rg, r)


def test_saturated_fraction_counts_pixels_clipped_in_any_channel():
    images = np.full((2, 3, 2, 2), 128, np.uint8)
    images[0, 0, 0, 0] = 255  # one pixel clipped in one channel
    images[1, :, 1, 1] = 0  # one pixel black in all channels
    assert saturated_fraction(images) == pytest.approx(2 / 8)


def test_summary_has_mean_std_and_runs():
    runs = [{"acc": 0.5, "f1": 0.4, "auc": 0.6, "sensitivity": 0.5, "specificity": 0.5},
            {"acc": 0.7, "f1": 0.6, "auc": 0.8, "sensitivity": 0.7, "specificity": 0.7}]
    curves = [{"loss": [1.0, 0.5], "acc": [0.5, 0.75]}, {"loss": [3.0, 1.5], "acc": [0.25, 1.0]}]
    out = summarise_runs(runs, [1.0, 3.0], curves)
    assert out["acc"] == {"mean": pytest.approx(0.6), "std": pytest.approx(0.1), "runs": [0.5, 0.7]}
    assert out["epoch_time_s"] == 2.0 and out["train_time_s"] == 2.0
    assert out["curve"] == {"loss": [2.0, 1.0], "acc": [0.375, 0.875]}  # epoch-wise mean of runs


def test_sharpness_aware_steps_take_the_gradient_at_the_perturbed_weights():
    """sam_rho > 0 (FTD's flat experts): one step descends the gradient taken at
    w + rho g / ||g||, then the weights are restored before the step; 0 is plain SGD."""
    import copy

    import torch.nn.functional as F

    torch.manual_seed(0)
    net = models.build("convnet", 2, 8, width=4, depth=1, norm="none")
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 0, 1, 0, 1])
    batches = lambda epoch: [(x, y, None)]  # noqa: E731
    rho, lr = 0.05, 0.1
    expected = copy.deepcopy(net)
    loss = F.cross_entropy(expected(x), y)
    grads = torch.autograd.grad(loss, list(expected.parameters()))
    norm = torch.norm(torch.stack([g.norm() for g in grads]))
    with torch.no_grad():
        for p, g in zip(expected.parameters(), grads):
            p.add_(g * rho / norm)
    sam_grads = torch.autograd.grad(F.cross_entropy(expected(x), y), list(expected.parameters()))
    with torch.no_grad():
        for p, g, s in zip(expected.parameters(), grads, sam_grads):
            p.sub_(g * rho / norm).sub_(lr * s)
    plain = copy.deepcopy(net)
    cfg = {**TRAIN, "epochs": 1, "lr": lr, "momentum": 0.0, "weight_decay": 0.0, "batch": 6,
           "schedule": "constant"}
    train(net, batches, TrainConfig.from_config({**cfg, "sam_rho": rho}), torch.Generator().manual_seed(0))
    train(plain, batches, TrainConfig.from_config(cfg), torch.Generator().manual_seed(0))
    for a, b, c in zip(net.parameters(), expected.parameters(), plain.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert not all(torch.allclose(a, c) for a, c in zip(net.parameters(), plain.parameters()))
