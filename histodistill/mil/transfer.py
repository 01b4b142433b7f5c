"""In-domain cross-centre transfer (Histo-DD's Table 5; rule ``transfer``).

For each ordered pair of training centres (target, source): a patch classifier and a slide-level
MIL model (CLAM-SB by default) are pre-trained on the target centre's real training data, then
fine-tuned for ``finetune.epochs`` (5) on the source centre's synthetic data and, separately,
on its full real data. All are tested on the real test split (patches; slides for the MIL
model), as is the pre-trained model before fine-tuning.

The source's synthetic data is what the source centre would share: the per-slide distilled
sets of its training slides (rule ``distill_slides``), used as labelled patches by the patch
classifier and as bags by the MIL model; its full data is every real training patch and bag of
its slides. Camelyon16's test slides carry no centre, so the test split is the whole test set.
Real patches are streamed from the store; synthetic sets are small and held in memory.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from histodistill import models
from histodistill.augment import Augment, AugmentConfig
from histodistill.data.store import PatchStore, store_slides
from histodistill.metrics import metrics, summarise_runs
from histodistill.runtime import Compute, device
from histodistill.training import Inputs, TrainConfig, predict, tensor_batches, train
from histodistill.io import InputError, write_json
from histodistill.mil.train import Bags, bag_storage, bag_metrics, train_model
from histodistill.stain import StainTemplate

log = logging.getLogger(__name__)
STAGE = "transfer"


def centres(store: PatchStore) -> list[int]:
    """The known centres of the training slides; fewer than two is an InputError."""
    found = sorted({s.centre for s in store_slides(store) if s.split == "train" and s.centre >= 0})
    if len(found) < 2:
        raise InputError(STAGE, store.path, f"cross-centre transfer needs training slides of two "
                         f"or more centres; the slides record {found}")
    return found


def _synthetic_patches(distilled: list[str | os.PathLike], centre: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The per-slide distilled images and labels of one centre's slides, concatenated."""
    images, labels = [], []
    for path in sorted(p for d in distilled for p in Path(d).glob("*.zarr")):
        group = zarr.open_group(str(path), mode="r")
        if int(group.attrs["centre"]) == centre:
            images.append(group["images"][:])
            labels.append(group["labels"][:])
    if not images:
        raise InputError(STAGE, ", ".join(map(str, distilled)), f"no distilled slide of centre "
                         f"{centre}")
    return np.concatenate(images), np.concatenate(labels)


def _patch_test(net: torch.nn.Module, inputs: Inputs, cfg: TrainConfig) -> dict[str, float]:
    prob, y = predict(net, inputs.split("test", 512), Compute.on(net, cfg.compute))
    return metrics(y, prob)


def _summary(results: list[dict[str, float]], times: list[list[float]]) -> dict[str, Any]:
    """Metrics over runs, seconds per epoch and per run, and the epochs of one run."""
    return {**summarise_runs(results, [t for ts in times for t in ts]), "epochs": len(times[0])}


def patch_transfer(inputs: Inputs, aug: Augment, arch: str, arch_kwargs: dict[str, Any],
                   pretrain: TrainConfig, finetune: TrainConfig, target_rows: np.ndarray,
                   source_rows: np.ndarray, syn: tuple[np.ndarray, np.ndarray], runs: int,
                   seed: int) -> dict[str, Any]:
    """Pre-train ``arch`` on the target rows, fine-tune on the source's synthetic patches and on
    its real rows; metrics on the real test split for all three, per run."""
    store = inputs.store
    num_classes, size = len(store.class_names), int(store.attrs["patch_size"])
    syn_x = inputs(torch.from_numpy(syn[0]))
    syn_y = torch.from_numpy(syn[1]).to(inputs.dev)
    res: dict[str, list] = {k: [] for k in ("pre", "syn", "full")}
    times: dict[str, list] = {k: [] for k in ("pre", "syn", "full")}
    for run in range(runs):
        gen = torch.Generator().manual_seed(seed + run)
        torch.manual_seed(seed + run)
        net = models.build(arch, num_classes, size, **arch_kwargs).to(inputs.dev)
        times["pre"].append(train(net, inputs.split_batches("train", pretrain.batch, seed + run, target_rows),
                                  pretrain, gen, aug, setting="mil.transfer.pretrain.epochs",
                                  repeats=runs - run))
        res["pre"].append(_patch_test(net, inputs, pretrain))
        for kind, batches in (("syn", tensor_batches(syn_x, syn_y, finetune.batch, gen)),
                              ("full", inputs.split_batches("train", finetune.batch, seed + run, source_rows))):
            tuned = copy.deepcopy(net)
            times[kind].append(train(tuned, batches, finetune, gen, aug))
            res[kind].append(_patch_test(tuned, inputs, finetune))
        log.info("patch run %d/%d: pre %.3f, synthetic %.3f, full %.3f", run + 1, runs,
                 res["pre"][-1]["acc"], res["syn"][-1]["acc"], res["full"][-1]["acc"])
    row_bytes = 3 * size ** 2
    return {"arch": arch,
            "pretrained": _summary(res["pre"], times["pre"]),
            "synthetic": {**_summary(res["syn"], times["syn"]), "patches": len(syn[0]),
                          "storage_gb": len(syn[0]) * row_bytes / 1e9},
            "full": {**_summary(res["full"], times["full"]), "patches": len(source_rows),
                     "storage_gb": len(source_rows) * row_bytes / 1e9}}


def slide_transfer(name: str, cfg: dict[str, Any], real_bags: str | os.PathLike,
                   synthetic_bags: str | os.PathLike, class_names: list[str], target: int,
                   source: int, epochs: int, runs: int, seed: int, cache_mb: float
                   ) -> dict[str, Any]:
    """Pre-train MIL model ``name`` on the target's real bags, fine-tune ``epochs`` on the
    source's synthetic bags and on its real bags; metrics on the real test slides, per run."""
    pre_bags = Bags(real_bags, class_names, "train", [target], cache_mb=cache_mb)
    test = Bags(real_bags, class_names, "test", cache_mb=cache_mb)
    sources = {"syn": Bags(synthetic_bags, class_names, "train", [source], cache_mb=cache_mb),
               "full": Bags(real_bags, class_names, "train", [source], cache_mb=cache_mb)}
    res: dict[str, list] = {k: [] for k in ("pre", "syn", "full")}
    times: dict[str, list] = {k: [] for k in ("pre", "syn", "full")}
    k = len(class_names)
    for run in range(runs):
        model, t, _ = train_model(name, cfg, pre_bags, k, seed + run)
        times["pre"].append(t)
        res["pre"].append(bag_metrics(model, test))
        for kind, bags in sources.items():
            tuned, t, _ = train_model(name, cfg, bags, k, seed + run, epochs, copy.deepcopy(model))
            times[kind].append(t)
            res[kind].append(bag_metrics(tuned, test))
    return {"model": name, "pretrained": _summary(res["pre"], times["pre"]),
            "synthetic": {**_summary(res["syn"], times["syn"]), **bag_storage(sources["syn"])},
            "full": {**_summary(res["full"], times["full"]), **bag_storage(sources["full"])}}


def transfer(store_path: str | os.PathLike, template_path: str | os.PathLike | None, *,
             distilled: list[str | os.PathLike], real_bags: str | os.PathLike,
             synthetic_bags: str | os.PathLike, cfg: dict[str, Any], dataset: str, method: str,
             ipc: int, out: str | os.PathLike, cache_mb: float) -> dict[str, Any]:
    """Both transfer directions between every pair of centres, written to ``out``.

    ``cfg``: ``transfer`` (``patch_arch``, ``pretrain``, ``finetune``, ``model``, ``runs``,
    ``seed``), ``model_settings`` (the MIL model's ``mil.settings`` entry), ``arch_kwargs``,
    ``augment`` and ``stain_norm`` (from ``evaluate``, how patch classifiers are trained).
    """
    store = PatchStore(store_path)
    tc = cfg["transfer"]
    template = StainTemplate.load(template_path) if template_path else None
    inputs = Inputs(store, template, bool(cfg["stain_norm"]), device(), cache_mb)
    aug = Augment(AugmentConfig.from_config(cfg["augment"]), template, inputs.stats.mean,
                  inputs.stats.std)
    pretrain = TrainConfig.from_config(tc["pretrain"])
    finetune = TrainConfig.from_config(tc["finetune"])
    slides = [s for s in store_slides(store) if s.split == "train"]
    rows = {c: np.concatenate([s.rows for s in slides if s.centre == c]) for c in centres(store)}
    directions = []
    for target in rows:
        for source in rows:
            if source == target:
                continue
            log.info("transfer: pre-trained on centre %d, fine-tuned on centre %d", target, source)
            patch = patch_transfer(inputs, aug, tc["patch_arch"], cfg["arch_kwargs"], pretrain,
                                   finetune, rows[target], rows[source],
                                   _synthetic_patches(distilled, source), int(tc["runs"]),
                                   int(tc["seed"]))
            slide = slide_transfer(tc["model"], cfg["model_settings"], real_bags, synthetic_bags,
                                   store.class_names, target, source, finetune.epochs,
                                   int(tc["runs"]), int(tc["seed"]), cache_mb)
            directions.append({"target": target, "source": source, "patch": patch,
                               "slide": slide})
    result = {"dataset": dataset, "method": method, "ipc": ipc, "centres": list(rows),
              "directions": directions, "config": cfg}
    write_json(out, result)
    return result
