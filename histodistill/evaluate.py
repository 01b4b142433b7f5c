"""Evaluation of distilled sets: every configured architecture trained on a set and tested on
the real split (:mod:`histodistill.training`'s loop, the DC/DSA reference protocol), the
full-data upper bound, the result record every table reads (see docs: "Result files"), and a
tuning candidate's record on the validation split (:func:`evaluate_candidate`)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import zarr

from histodistill.augment import Augment, AugmentConfig
from histodistill.data.store import PatchStore, fingerprint
from histodistill.io import InputError, read_json, settings_hash, write_json
from histodistill.metrics import cross_arch, saturated_fraction
from histodistill.runtime import device, versions
from histodistill.stain import StainTemplate
from histodistill.state import Checkpoint
from histodistill.training import Inputs, TrainConfig, evaluate_arch, tensor_batches


def _setup(store_path: str | os.PathLike, template_path: str | os.PathLike | None,
           cfg: dict[str, Any]) -> tuple[PatchStore, Inputs, Augment]:
    store = PatchStore(store_path)
    template = StainTemplate.load(template_path) if template_path else None
    inputs = Inputs(store, template, bool(cfg["stain_norm"]), device(), float(cfg["cache_mb"]))
    aug = Augment(AugmentConfig.from_config(cfg["augment"]), template,
                  inputs.stats.mean, inputs.stats.std)
    return store, inputs, aug


def full_train(store_path: str | os.PathLike, template_path: str | os.PathLike | None, arch: str,
               *, cfg: dict[str, Any], out: str | os.PathLike,
               checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """The upper bound: ``arch`` trained once on the whole real training split (streamed),
    resumable per epoch from ``checkpoint``."""
    store, inputs, aug = _setup(store_path, template_path, cfg)
    train_cfg = TrainConfig.from_config(cfg["full"])
    seed = int(cfg["seed"])
    settings = {k: v for k, v in cfg.items() if k != "cache_mb"}
    ckpt = Checkpoint(checkpoint, settings_hash([arch, settings, fingerprint(store, template_path)]))
    result = evaluate_arch(arch, cfg["arch_kwargs"].get(arch, {}),
                           lambda gen: inputs.split_batches("train", train_cfg.batch, seed),
                           inputs, int(store.attrs["patch_size"]), len(store.class_names),
                           train_cfg, 1, seed, aug, ckpt, setting="evaluate.full.epochs")
    result["epochs"] = train_cfg.epochs
    write_json(out, result)
    ckpt.remove()
    return result


def train_on_set(images: np.ndarray, labels: np.ndarray, store_path: str | os.PathLike,
                 template_path: str | os.PathLike | None, cfg: dict[str, Any],
                 split: str = "test") -> dict[str, dict[str, Any]]:
    """Train every configured architecture (``archs`` and ``extra_archs``) ``runs`` times on a
    distilled set (uint8 images, labels) and test each on the real ``split``; per-architecture
    summaries (:func:`summarise_runs`)."""
    store, inputs, aug = _setup(store_path, template_path, cfg)
    syn_x = inputs(torch.from_numpy(images))
    syn_y = torch.from_numpy(labels).to(inputs.dev)
    train_cfg = TrainConfig.from_config(cfg["train"])
    extra_loss = None
    if cfg.get("boundary"):  # InfoDist trains on its selected set with its boundary loss
        from histodistill.select.boundary import boundary_term

        extra_loss = boundary_term(cfg["boundary"])
    archs = [*cfg["archs"], *[a for a in cfg.get("extra_archs", []) if a not in cfg["archs"]]]
    return {arch: evaluate_arch(arch, cfg["arch_kwargs"].get(arch, {}),
                                lambda gen: tensor_batches(syn_x, syn_y, train_cfg.batch, gen),
                                inputs, int(images.shape[-1]), len(store.class_names), train_cfg,
                                int(cfg["runs"]), int(cfg["seed"]), aug, split=split,
                                extra_loss=extra_loss)
            for arch in archs}


def set_record(distilled: str | os.PathLike, distill_stats: str | os.PathLike,
               store_path: str | os.PathLike, template_path: str | os.PathLike | None,
               cfg: dict[str, Any], split: str = "test") -> dict[str, Any]:
    """What every evaluation of a distilled set records: each architecture trained on it and
    tested on the real ``split`` (cross-architecture figure with ``extra_archs``), its saturated
    share, the distillation's cost file and the settings; with ``both_protocols``, the same
    under the other stain protocol (``other_protocol``)."""
    group = zarr.open_group(str(distilled), mode="r")
    attrs = dict(group.attrs)
    images, labels = group["images"][:], group["labels"][:]

    def figures(protocol: dict[str, Any]) -> dict[str, Any]:
        patch = train_on_set(images, labels, store_path, template_path, protocol, split=split)
        out = {"stain_norm": bool(protocol["stain_norm"]), "patch": patch}
        if protocol.get("extra_archs"):
            out["cross_arch"] = cross_arch(patch, attrs["config"].get("net"))
        return out

    record = {"method": attrs["method"], "ipc": attrs["ipc"], "split": split, **figures(cfg),
              "saturated_fraction": saturated_fraction(images),
              "distill": read_json(distill_stats, "evaluate"),
              "config": {"distill": attrs["config"], "evaluate": cfg, "seed": attrs["seed"]}}
    if cfg["both_protocols"]:
        record["other_protocol"] = figures({**cfg, "stain_norm": not cfg["stain_norm"]})
    return record


def evaluate_distilled(distilled: str | os.PathLike, distill_stats: str | os.PathLike, *,
                       store_path: str | os.PathLike, template_path: str | os.PathLike | None,
                       full: dict[str, str | os.PathLike], cfg: dict[str, Any], dataset: str,
                       out: str | os.PathLike) -> dict[str, Any]:
    """Train every configured architecture on the distilled set, test on the real test split,
    and write the shared result JSON (see docs: "Result files"): :func:`set_record` under the
    method's stain protocol (``cfg['stain_norm']``, resolved per method by the rule), the
    full-data upper bounds and the training-time ratios."""
    record = set_record(distilled, distill_stats, store_path, template_path, cfg)
    full_results, ratio = {}, {}
    for arch in cfg["archs"]:  # upper bounds of the evaluated archs, not of the cross-arch extras
        if arch in full:
            full_results[arch] = read_json(full[arch], "evaluate")
            ratio[arch] = (full_results[arch]["train_time_s"]
                           / max(record["patch"][arch]["train_time_s"], 1e-9))
    result = {"dataset": dataset, **record, "full": full_results, "train_time_ratio": ratio,
              "versions": versions()}
    write_json(out, result)
    return result


def selection_split(store: PatchStore) -> str:
    """The split settings are chosen on: ``val``. A store without one is refused (settings are
    never chosen on the test split)."""
    if len(store.indices("val")) == 0:
        raise InputError("tune", store.path, "has no val split to choose settings on; give the "
                         "dataset a validation split (a val folder or array, or val_fraction for "
                         "a slide cohort): settings are never chosen on the test split")
    return "val"


def evaluate_candidate(distilled: str | os.PathLike, cost: str | os.PathLike, *,
                       store_path: str | os.PathLike, template_path: str | os.PathLike | None,
                       evaluate: dict[str, Any], overrides: dict[str, Any],
                       out: str | os.PathLike) -> dict[str, Any]:
    """Train the evaluation architectures on one candidate's set (a tuning candidate, a study
    set) and test them on the validation split, under the other stain protocol too when
    ``evaluate['both_protocols']`` (a study's ablation; tuning judges one protocol); write the
    record (overrides, validation figures, cost)."""
    split = selection_split(PatchStore(store_path))
    record = {"overrides": overrides,
              **set_record(distilled, cost, store_path, template_path, evaluate, split=split)}
    write_json(out, record)
    return record
