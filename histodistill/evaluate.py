"""Training and testing patch classifiers: metrics, the InfoDist boundary loss, train loops.

The same loop trains pool networks, coreset feature networks, networks on distilled sets and
the full-data upper bound, so every number is produced the same way.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from histodistill import models
from histodistill.augment import Augment, AugmentConfig
from histodistill.io import write_json
from histodistill.stain import StainTemplate
from histodistill.store import PatchStore, load_split

log = logging.getLogger(__name__)


def device() -> torch.device:
    """CUDA when present, else CPU (the same code path)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def metrics(y_true: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """Accuracy, macro F1 and one-vs-rest AUC (macro over classes; binary: positive class).

    ``prob`` is (N, C) class probabilities. AUC uses the rank (Mann-Whitney) formula with tied
    scores sharing their average rank; a class absent from ``y_true`` is skipped.
    """
    y_true = np.asarray(y_true)
    pred = prob.argmax(1)
    n_classes = prob.shape[1]
    f1s = []
    for c in range(n_classes):
        tp = np.sum((pred == c) & (y_true == c))
        fp = np.sum((pred == c) & (y_true != c))
        fn = np.sum((pred != c) & (y_true == c))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    classes = [1] if n_classes == 2 else range(n_classes)
    aucs = [_auc(y_true == c, prob[:, c]) for c in classes if 0 < np.sum(y_true == c) < len(y_true)]
    return {"acc": float(np.mean(pred == y_true)), "f1": float(np.mean(f1s)),
            "auc": float(np.mean(aucs)) if aucs else float("nan")}


def _auc(positive: np.ndarray, score: np.ndarray) -> float:
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    sorted_scores = score[order]
    i = 0
    while i < len(score):  # average ranks over ties
        j = i
        while j + 1 < len(score) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def boundary_loss(logits: torch.Tensor, y: torch.Tensor, rho: float, tau: float) -> torch.Tensor:
    """InfoDist's boundary loss, summed over classes.

    For class c with probabilities p = softmax(logits)[:, c]: the positive boundary b_p is the
    probability at rank B*rho among the positives sorted descending (B positives), b_n = b_p - tau;
    L_c = sum_pos |min(p_i - b_p, 0)| + sum_neg |max(p_j - b_n + tau, 0)|.
    """
    prob = logits.softmax(1)
    total = logits.new_zeros(())
    for c in range(logits.shape[1]):
        pos, neg = prob[y == c, c], prob[y != c, c]
        if len(pos) == 0:
            continue
        ranked = pos.sort(descending=True).values
        b_p = ranked[min(int(len(pos) * rho), len(pos) - 1)].detach()
        b_n = b_p - tau
        total = total + (pos - b_p).clamp(max=0).abs().sum() + (neg - b_n + tau).clamp(min=0).abs().sum()
    return total


@dataclass
class TrainConfig:
    """Optimisation settings (DC's evaluation protocol by default: SGD, lr x0.1 at half)."""

    epochs: int = 300
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch: int = 256
    schedule: str = "step"  # "step" (x0.1 at half), "cosine" or "constant"
    boundary: dict[str, float] = field(default_factory=dict)  # {"weight", "rho", "tau"} or {}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "TrainConfig":
        return cls(**{k: v for k, v in cfg.items() if k in cls.__dataclass_fields__})


def train(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
          gen: torch.Generator, aug: Augment | None = None,
          on_epoch: Any = None) -> list[float]:
    """Train ``net`` in place on (x in [0, 1], y); returns seconds per epoch.

    ``on_epoch(epoch, correct)`` is called after each epoch with a (N,) bool tensor telling which
    samples the network classified correctly when they were presented (forgetting uses it).
    """
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    if cfg.schedule == "step":
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [max(1, cfg.epochs // 2)], 0.1)
    elif cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    net.train()
    times = []
    for epoch in range(cfg.epochs):
        start = time.perf_counter()
        correct = torch.zeros(len(x), dtype=torch.bool)
        for batch in torch.randperm(len(x), generator=gen).split(cfg.batch):
            xb = x[batch]
            if aug is not None and aug.enabled:
                xb = aug(xb, gen)
            logits = net(xb)
            loss = F.cross_entropy(logits, y[batch])
            if cfg.boundary:
                loss = loss + cfg.boundary["weight"] * boundary_loss(
                    logits, y[batch], cfg.boundary["rho"], cfg.boundary["tau"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct[batch] = (logits.argmax(1) == y[batch]).cpu()
        sched.step()
        times.append(time.perf_counter() - start)
        if on_epoch is not None:
            on_epoch(epoch, correct)
    return times


@torch.no_grad()
def predict(net: torch.nn.Module, x: torch.Tensor, batch: int = 512) -> np.ndarray:
    """Class probabilities (N, C) for images in [0, 1]."""
    net.eval()
    return torch.cat([net(xb).softmax(1).cpu() for xb in x.split(batch)]).numpy()


def summarise_runs(runs: list[dict[str, float]], epoch_times: list[float]) -> dict[str, Any]:
    """Mean, std and per-run values of each metric, and the mean seconds per epoch."""
    out: dict[str, Any] = {}
    for key in ("acc", "f1", "auc"):
        values = [r[key] for r in runs]
        out[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "runs": values}
    out["epoch_time_s"] = float(np.mean(epoch_times))
    out["train_time_s"] = float(np.sum(epoch_times) / max(len(runs), 1))
    return out


def evaluate_arch(arch: str, arch_kwargs: dict[str, Any], train_x: torch.Tensor, train_y: torch.Tensor,
                  test_x: torch.Tensor, test_y: np.ndarray, num_classes: int, cfg: TrainConfig,
                  runs: int, seed: int, aug: Augment | None) -> dict[str, Any]:
    """Train ``arch`` ``runs`` times (seeds seed, seed+1, ...) and test each on the real test set."""
    results, times = [], []
    dev = train_x.device
    for run in range(runs):
        gen = torch.Generator().manual_seed(seed + run)
        torch.manual_seed(seed + run)
        net = models.build(arch, num_classes, train_x.shape[-1], **arch_kwargs).to(dev)
        times += train(net, train_x, train_y, cfg, gen, aug)
        results.append(metrics(test_y, predict(net, test_x)))
        log.info("%s run %d/%d: acc %.4f, auc %.4f (%.1fs)", arch, run + 1, runs,
                 results[-1]["acc"], results[-1]["auc"], sum(times[-cfg.epochs:]))
    return summarise_runs(results, times)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("histodistill", "torch", "torchvision", "numpy", "zarr", "openslide-python",
                 "snakemake"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _test_and_augment(store_path: str | os.PathLike, template_path: str | os.PathLike | None,
                      cfg: dict[str, Any]) -> tuple[torch.Tensor, np.ndarray, int, Augment]:
    store = PatchStore(store_path)
    x, y, _ = load_split(store, "test")
    if len(x) == 0:
        raise ValueError(f"{store_path} has no test split to evaluate on")
    template = StainTemplate.load(template_path) if template_path else None
    aug = Augment(AugmentConfig.from_config(cfg.get("augment", {})), template)
    return torch.from_numpy(x).to(device()).float().div_(255), y, len(store.class_names), aug


def full_train(store_path: str | os.PathLike, template_path: str | os.PathLike | None, arch: str,
               cfg: dict[str, Any], out: str | os.PathLike) -> dict[str, Any]:
    """The upper bound: ``arch`` trained once on the whole real training split."""
    test_x, test_y, n_classes, aug = _test_and_augment(store_path, template_path, cfg)
    x, y, _ = load_split(PatchStore(store_path), "train")
    train_x = torch.from_numpy(x).to(device()).float().div_(255)
    train_cfg = TrainConfig.from_config(cfg["full"])
    result = evaluate_arch(arch, cfg.get("arch_kwargs", {}).get(arch, {}), train_x,
                           torch.from_numpy(y).to(device()), test_x, test_y, n_classes, train_cfg,
                           1, int(cfg["seed"]), aug)
    result["epochs"] = train_cfg.epochs
    write_json(out, result)
    return result


def evaluate_distilled(distilled: str | os.PathLike, distill_stats: str | os.PathLike,
                       store_path: str | os.PathLike, template_path: str | os.PathLike | None,
                       full: dict[str, str | os.PathLike], cfg: dict[str, Any], dataset: str,
                       out: str | os.PathLike) -> dict[str, Any]:
    """Train every configured architecture on the distilled set, test on the real test split,
    and write the shared result JSON (see README: "Result files")."""
    group = zarr.open_group(str(distilled), mode="r")
    attrs = dict(group.attrs)
    test_x, test_y, n_classes, aug = _test_and_augment(store_path, template_path, cfg)
    syn_x = torch.from_numpy(group["images"][:]).to(device()).float().div_(255)
    syn_y = torch.from_numpy(group["labels"][:]).to(device())
    train_cfg = TrainConfig.from_config({**cfg["train"], "boundary": cfg.get("boundary", {})})
    patch, full_results, ratio = {}, {}, {}
    for arch in cfg["archs"]:
        patch[arch] = evaluate_arch(arch, cfg.get("arch_kwargs", {}).get(arch, {}), syn_x, syn_y,
                                    test_x, test_y, n_classes, train_cfg, int(cfg["runs"]),
                                    int(cfg["seed"]), aug)
        full_results[arch] = json.loads(Path(full[arch]).read_text())
        ratio[arch] = full_results[arch]["train_time_s"] / max(patch[arch]["train_time_s"], 1e-9)
    result = {"dataset": dataset, "method": attrs["method"], "ipc": attrs["ipc"], "patch": patch,
              "full": full_results, "train_time_ratio": ratio,
              "distill": json.loads(Path(distill_stats).read_text()),
              "config": {"distill": attrs["config"], "evaluate": cfg, "seed": attrs["seed"]},
              "versions": _versions()}
    write_json(out, result)
    return result
