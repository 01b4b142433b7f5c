"""Training and testing MIL models on feature bags (rules ``full_mil`` and ``evaluate_mil``).

Every model is trained the way its reference trains it, one bag per step: its own loss,
optimiser and schedule (:mod:`histodistill.mil.base`), ``epochs`` passes over the training bags
in a seeded random order (CLAM's ``weighted_sample`` draws bags with probability inversely
proportional to their class's count instead), gradients accumulated over ``grad_accum`` bags
(TransMIL: 2). Models are trained ``runs`` times (seeds seed, seed + 1, ...) and every run is
tested on the real test slides; metrics come from :func:`histodistill.metrics.metrics`.

Departure: the references stop early on a validation split's loss (CLAM patience 20 from epoch
50, DSMIL 10, TransMIL 10); the datasets here have no validation slides by default, so every
run trains its full ``epochs`` (choosing the epoch on the test slides would leak them).

Bags are read from their files when used, unless the training bags fit in ``cache_mb``, in
which case they are read once; memory does not grow with the cohort. A run that finished is
recorded in ``<out>.runs.json`` (keyed by settings and inputs), so a rerun after a crash
resumes at the next run.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from histodistill.metrics import metrics, summarise_runs
from histodistill.runtime import device
from histodistill.io import InputError, read_json, settings_hash, write_json
from histodistill.mil.bags import bag_path, folder_bytes, read_bag, read_manifest
from histodistill.mil.base import MILModel, build
from histodistill.state import load_resume

log = logging.getLogger(__name__)
STAGE = "evaluate_mil"
_MIB = 2**20


class Bags:
    """The bags of one split of a bag folder (``split=None``: all), with slide labels as class
    indices; optionally only the slides of some ``centres``."""

    def __init__(self, folder: str | os.PathLike, class_names: list[str],
                 split: str | None = "train", centres: list[int] | None = None, *,
                 cache_mb: float) -> None:
        self.folder = Path(folder)
        rows = [r for r in read_manifest(folder) if split is None or r["split"] == split]
        if centres is not None:
            rows = [r for r in rows if r["centre"] in centres]
        if not rows:
            raise InputError(STAGE, self.folder, f"no bags of split {split!r}"
                             + (f" and centres {centres}" if centres is not None else ""))
        unknown = sorted({r["label"] for r in rows} - set(class_names))
        if unknown:
            raise InputError(STAGE, self.folder / "bags.csv", f"slide labels {unknown} are not "
                             f"among the classes {class_names}")
        self.rows = rows
        self.labels = np.array([class_names.index(r["label"]) for r in rows], np.int64)
        self.bytes = folder_bytes(folder, rows)
        first = read_bag(bag_path(folder, rows[0]["slide_id"]))
        self.dim = int(first.features.shape[1])
        self.patch_size = int(first.attrs.get("patch_size", 0))
        n_values = sum(r["patches"] for r in rows) * self.dim * 4
        self._cache = ([self._read(i) for i in range(len(rows))]
                       if n_values <= cache_mb * _MIB else None)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def patches(self) -> int:
        return sum(r["patches"] for r in self.rows)

    def _read(self, i: int) -> torch.Tensor:
        bag = read_bag(bag_path(self.folder, self.rows[i]["slide_id"]))
        if bag.features.shape[1] != self.dim:
            raise InputError(STAGE, bag_path(self.folder, self.rows[i]["slide_id"]),
                             f"features of dimension {bag.features.shape[1]}, the folder's "
                             f"first bag has {self.dim}")
        return torch.from_numpy(bag.features)

    def features(self, i: int) -> torch.Tensor:
        return self._cache[i] if self._cache is not None else self._read(i)


def _order(labels: np.ndarray, weighted: bool, rng: np.random.Generator) -> np.ndarray:
    """One epoch's bag order: a permutation, or (CLAM's weighted sampling) as many draws with
    replacement, each bag weighted by 1 / (bags of its class)."""
    if not weighted:
        return rng.permutation(len(labels))
    counts = np.bincount(labels)
    w = 1.0 / counts[labels]
    return rng.choice(len(labels), len(labels), replace=True, p=w / w.sum())


def train_model(name: str, cfg: dict[str, Any], bags: Bags, num_classes: int, seed: int,
                epochs: int | None = None, model: MILModel | None = None,
                progress: bool = False) -> tuple[MILModel, list[float], dict[str, list[float]]]:
    """Train model ``name`` (or continue training ``model``: fine-tuning) on ``bags`` for
    ``epochs`` (default ``cfg['epochs']``); returns the model, seconds per epoch and the
    training curve (mean loss and accuracy of the bags as presented, per epoch)."""
    dev = device()
    if model is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build(name, bags.dim, num_classes, cfg)
    model = model.to(dev)
    epochs = int(cfg["epochs"]) if epochs is None else epochs
    opt = model.optimizer()
    sched = model.scheduler(opt, epochs)
    accum = int(cfg["grad_accum"])
    rng = np.random.default_rng([seed, 7])
    gen = torch.Generator().manual_seed(seed)
    times: list[float] = []
    curve: dict[str, list[float]] = {"loss": [], "acc": []}
    model.train()
    for _ in tqdm(range(epochs), desc=f"{name} epochs", disable=not progress, leave=False):
        start = time.perf_counter()
        order = _order(bags.labels, bool(cfg["weighted_sample"]), rng)
        total, hits = 0.0, 0
        opt.zero_grad(set_to_none=True)
        with torch.random.fork_rng(devices=[]):  # dropout draws from this run's generator
            torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=gen)))
            for step, i in enumerate(order, 1):
                label = int(bags.labels[i])
                loss, out = model.loss(bags.features(int(i)).to(dev), label)
                (loss / accum).backward()
                if step % accum == 0 or step == len(order):
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                total += float(loss.detach())
                hits += int(int(model.probabilities(out).argmax()) == label)
        if sched is not None:
            sched.step()
        times.append(time.perf_counter() - start)
        curve["loss"].append(total / len(order))
        curve["acc"].append(hits / len(order))
    return model, times, curve


@torch.no_grad()
def bag_metrics(model: MILModel, bags: Bags) -> dict[str, float]:
    """Metrics of ``model`` on ``bags`` (accuracy, macro F1, AUC, sensitivity, specificity)."""
    model.eval()
    dev = next(model.parameters()).device
    probs = np.stack([model.probabilities(model(bags.features(i).to(dev))).cpu().numpy()
                      for i in range(len(bags))])
    return metrics(bags.labels, probs)


def run_model(name: str, cfg: dict[str, Any], train: Bags, test: Bags, num_classes: int,
              runs: int, seed: int, resume: Path | None = None, progress: bool = True
              ) -> dict[str, Any]:
    """Train ``name`` ``runs`` times on ``train`` and test each run on ``test``; mean, std and
    per-run metrics, seconds per epoch and training curves (as the patch-level results).
    Finished runs are kept in ``resume`` (a JSON file keyed by ``cfg``, seeds and bags)."""
    key = settings_hash([name, cfg, seed, [r["slide_id"] for r in train.rows], train.bytes,
                         test.bytes])
    state = load_resume(resume, key)  # a damaged file of finished runs is logged and redone
    done: list[dict[str, Any]] = state["runs"] if state is not None else []
    for run in tqdm(range(len(done), runs), desc=f"{name} runs", disable=not progress,
                    initial=len(done), total=runs):
        model, times, curve = train_model(name, cfg, train, num_classes, seed + run)
        done.append({"metrics": bag_metrics(model, test), "times": times, "curve": curve})
        log.info("%s run %d/%d: acc %.4f, auc %.4f (%.2fs/epoch)", name, run + 1, runs,
                 done[-1]["metrics"]["acc"], done[-1]["metrics"]["auc"], np.mean(times))
        if resume is not None:
            write_json(resume, {"key": key, "runs": done})
    summary = summarise_runs([d["metrics"] for d in done[:runs]],
                             [t for d in done[:runs] for t in d["times"]],
                             [d["curve"] for d in done[:runs]])
    summary["epochs"] = int(cfg["epochs"])
    return summary


def bag_storage(bags: Bags) -> dict[str, Any]:
    """What a bag set costs to keep: bag files on disk, and the uint8 patch images behind them."""
    return {"slides": len(bags), "patches": bags.patches, "bag_gb": bags.bytes / 1e9,
            "image_gb": bags.patches * 3 * bags.patch_size ** 2 / 1e9, "feature_dim": bags.dim}


def full_mil(real_bags: str | os.PathLike, class_names: list[str], model: str, *,
             cfg: dict[str, Any], runs: int, seed: int, out: str | os.PathLike,
             cache_mb: float) -> dict[str, Any]:
    """The full-bag upper bound of one model: trained ``runs`` times on every real training
    bag, tested on the real test bags (cached per model, rule ``full_mil``)."""
    train = Bags(real_bags, class_names, "train", cache_mb=cache_mb)
    test = Bags(real_bags, class_names, "test", cache_mb=cache_mb)
    resume = _resume(out, model)
    result = run_model(model, cfg, train, test, len(class_names), runs, seed, resume)
    result["bags"] = bag_storage(train)
    write_json(out, result)
    resume.unlink(missing_ok=True)
    return result


def evaluate_mil(synthetic_bags: str | os.PathLike, real_bags: str | os.PathLike, *,
                 full: dict[str, str | os.PathLike], class_names: list[str],
                 settings: dict[str, Any], out: str | os.PathLike,
                 cache_mb: float) -> dict[str, Any]:
    """Train every model of ``settings['models']`` on the synthetic bags of the training slides
    and test on the real test bags; join each model's cached full-bag result (``full``) and
    write the ``slide`` section of the result file (README: slide level)."""
    train = Bags(synthetic_bags, class_names, "train", cache_mb=cache_mb)
    test = Bags(real_bags, class_names, "test", cache_mb=cache_mb)
    models: dict[str, Any] = {}
    full_bags: dict[str, Any] = {}
    for name in settings["models"]:
        cfg = settings["settings"][name]
        synthetic = run_model(name, cfg, train, test, len(class_names), int(settings["runs"]),
                              int(settings["seed"]), _resume(out, name))
        reference = read_json(full[name], "evaluate_mil")
        full_bags = reference.pop("bags")
        ratio = reference["epoch_time_s"] / max(synthetic["epoch_time_s"], 1e-12)
        models[name] = {"synthetic": synthetic, "full": reference, "epoch_time_ratio": ratio,
                        "acc_gap": reference["acc"]["mean"] - synthetic["acc"]["mean"]}
    storage = bag_storage(train)
    result = {"encoder": settings["encoder"], "models": models,
              "bags": {"synthetic": storage, "full": full_bags},
              "storage_ratio": storage["bag_gb"] / max(full_bags["bag_gb"], 1e-18),
              "image_storage_ratio": storage["image_gb"] / max(full_bags["image_gb"], 1e-18),
              "test_slides": len(test),
              "config": {k: settings[k] for k in ("models", "settings", "runs", "seed", "encoder")}}
    write_json(out, result)
    for name in settings["models"]:
        _resume(out, name).unlink(missing_ok=True)
    return result


def _resume(out: str | os.PathLike, name: str) -> Path:
    return Path(f"{out}.{name}.runs.json")
