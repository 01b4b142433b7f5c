"""Metrics against scikit-learn, the InfoDist boundary loss, and the training loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from histodistill import models
from histodistill.evaluate import TrainConfig, boundary_loss, metrics, predict, summarise_runs, train


def test_binary_metrics_match_sklearn_with_ties():
    y = np.array([0, 0, 1, 1, 1, 0, 1, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.4, 0.9, 0.7, 0.2, 0.6])
    prob = np.stack([1 - p1, p1], 1)
    got = metrics(y, prob)
    pred = prob.argmax(1)
    assert got["acc"] == pytest.approx(accuracy_score(y, pred))
    assert got["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert got["auc"] == pytest.approx(roc_auc_score(y, p1))


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    logits = rng.normal(size=(200, 4)) + np.eye(4)[y] * 1.5
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    got = metrics(y, prob)
    assert got["acc"] == pytest.approx(accuracy_score(y, prob.argmax(1)))
    assert got["f1"] == pytest.approx(f1_score(y, prob.argmax(1), average="macro"))
    assert got["auc"] == pytest.approx(roc_auc_score(y, prob, multi_class="ovr", average="macro"))


def test_boundary_loss_known_answer():
    # class 1 probabilities 0.9, 0.6, 0.3 for positives; 0.5, 0.2 for negatives
    p = torch.tensor([0.9, 0.6, 0.3, 0.5, 0.2])
    logits = torch.stack([torch.log(1 - p), torch.log(p)], 1)
    y = torch.tensor([1, 1, 1, 0, 0])
    # class 1: B=3, rho=0.5 -> rank 1 -> b_p=0.6, b_n=0.5; positives below b_p: |0.3-0.6| = 0.3;
    # negatives above b_n - tau = 0.4: 0.5 -> 0.1.  Class 0 (p0 = 1 - p): positives 0.5, 0.8 ->
    # b_p = 0.5; none below; negatives 0.1, 0.4, 0.7 above 0.3: 0.1 + 0.4 = 0.5 (0.4 -> 0.1, 0.7 -> 0.4)
    loss = boundary_loss(logits, y, rho=0.5, tau=0.1)
    assert loss.item() == pytest.approx(0.3 + 0.1 + 0.1 + 0.4, abs=1e-5)


def test_training_learns_a_separable_toy_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(32, 3, 16, 16, generator=gen) * 0.3,
                   0.7 + torch.rand(32, 3, 16, 16, generator=gen) * 0.3])
    y = torch.arange(2).repeat_interleave(32)
    torch.manual_seed(0)
    net = models.build("convnet", 2, 16, width=8, norm="batchnorm")
    cfg = TrainConfig(epochs=15, lr=0.05, batch=16, boundary={"weight": 1.0, "rho": 0.5, "tau": 0.1})
    seen = []
    times = train(net, x, y, cfg, gen, on_epoch=lambda e, correct: seen.append(correct.float().mean()))
    assert len(times) == 15 and len(seen) == 15 and seen[-1] == 1.0
    assert metrics(y.numpy(), predict(net, x))["acc"] == 1.0


def test_summary_has_mean_std_and_runs():
    out = summarise_runs([{"acc": 0.5, "f1": 0.4, "auc": 0.6}, {"acc": 0.7, "f1": 0.6, "auc": 0.8}],
                         [1.0, 3.0])
    assert out["acc"] == {"mean": pytest.approx(0.6), "std": pytest.approx(0.1), "runs": [0.5, 0.7]}
    assert out["epoch_time_s"] == 2.0 and out["train_time_s"] == 2.0
