"""Rule ``augment_study``: HistoDiffusion's Table 1 (Ye et al., MICCAI 2023). A classifier is
trained on a small balanced subset of the real training split (``fraction``, 5 % by default)
alone, then with synthetic images chosen by a selector added at ``ratios`` of the subset's size
(50, 100, 200, 300 %), and with the same number of randomly chosen synthetic images at
``control_ratio`` (the control). Each setting reports accuracy, macro F1, sensitivity,
specificity (and AUC) on the real test split, mean and std over ``runs`` seeded trainings
(:func:`histodistill.evaluate.evaluate_arch`, the pipeline's protocol), and the in-domain FID of
the images added (:func:`histodistill.generate.quality.frechet_distance` between encoder
features of the added images and of the real training patches).

Real and synthetic images are streamed from their stores each epoch, every batch mixing both in
proportion to their counts; nothing but features is held in memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from itertools import zip_longest
from typing import Any

import numpy as np

from histodistill.augment import Augment, AugmentConfig
from histodistill.data.real import device_batches
from histodistill.data.stream import iterate
from histodistill.data.store import PatchStore
from histodistill.runtime import device, versions
from histodistill.training import Batches, Inputs, TrainConfig, evaluate_arch
from histodistill.generate.quality import frechet_distance, real_rows, store_features
from histodistill.io import InputError, write_json
from histodistill.select.base import Selector, build
from histodistill.select.run import open_pool, per_class, selection_context
from histodistill.stain import StainTemplate

log = logging.getLogger(__name__)
STAGE = "augment_study"


def real_subset(store: PatchStore, fraction: float, seed: int) -> tuple[np.ndarray, int]:
    """Seeded training rows, the same number of every class: ``fraction`` of the split divided
    evenly (at least one per class). Returns the rows and the count per class."""
    rows = store.indices("train")
    labels = store.array("label")[rows]
    k = max(1, int(fraction * len(rows) / len(store.class_names)))
    subset = []
    for c, name in enumerate(store.class_names):
        have = rows[labels == c]
        if len(have) < k:
            raise InputError(STAGE, store.path, f"class {name!r} has {len(have)} training patches, "
                             f"fewer than the {k} a balanced {fraction:.0%} subset needs")
        subset.append(np.random.default_rng([seed, c, 1]).permutation(have)[:k])
    return np.sort(np.concatenate(subset)), k


def mixed_batches(inputs: Inputs, sources: list[tuple[PatchStore, np.ndarray]], batch: int,
                  seed: int, buffer_mb: float) -> Batches:
    """Training batches over several stores' training rows: each epoch streams every source
    (seeded shuffle) with a batch share proportional to its row count, and concatenates one
    share of each into a batch of network inputs."""
    sources = [(s, r) for s, r in sources if len(r)]
    total = sum(len(r) for _, r in sources)
    shares = [max(1, round(batch * len(r) / total)) for _, r in sources]

    def epoch(e: int):  # noqa: ANN202
        streams = [iterate(store, "train", b, seed * 100003 + e * 31 + k, buffer_mb, rows=rows)
                   for k, ((store, rows), b) in enumerate(zip(sources, shares))]
        def joined() -> Iterator[tuple[np.ndarray, np.ndarray, None]]:
            for row in zip_longest(*streams):
                parts = [p for p in row if p is not None]
                yield (np.concatenate([p[0] for p in parts]),
                       np.concatenate([p[1] for p in parts]), None)

        return device_batches(joined(), inputs, inputs.dev, inputs.prefetch)

    return epoch


def augment_study(dataset: str, selector_method: str, *, sel_cfg: dict[str, Any],
                  cfg: dict[str, Any], seed: int, store_path: str | os.PathLike,
                  pool_path: str | os.PathLike, encoder_path: str | os.PathLike,
                  template_path: str | os.PathLike | None, out: str | os.PathLike,
                  cache_mb: float) -> dict[str, Any]:
    """Run the study (see module docstring) and write ``out``."""
    real = PatchStore(store_path)
    pool = open_pool(pool_path, real, STAGE)
    ctx = selection_context(sel_cfg, seed, pool, real, encoder_path)
    selected, control = build(sel_cfg["selector"], sel_cfg, ctx), build("random", {}, ctx)
    subset, k_real = real_subset(real, float(cfg["fraction"]), seed)
    template = StainTemplate.load(template_path) if template_path else None
    inputs = Inputs(real, template, bool(cfg["stain_norm"]), device(), cache_mb)
    aug = Augment(AugmentConfig.from_config(cfg["augment"]), template, inputs.stats.mean,
                  inputs.stats.std)
    train_cfg = TrainConfig.from_config(cfg["train"])
    assert ctx.encoder is not None  # given encoder_path (the study always has one)
    real_feats, _ = store_features(ctx.encoder.embed, real, "train", 256,
                                   real_rows(real, int(cfg["max_real"]), seed))
    settings: list[tuple[str, float, Selector | None]] = [("real only", 0.0, None)]
    settings += [("selected", float(r), selected) for r in cfg["ratios"]]
    settings.append(("random", float(cfg["control_ratio"]), control))
    results = []
    for name, ratio, selector in settings:
        k = int(round(ratio * k_real))
        if k:
            assert selector is not None  # only "real only" has none, and its ratio is 0
            pos = per_class(selector, ctx.pool, k, STAGE)
        else:
            pos = np.zeros(0, np.int64)
        sources = [(real, subset), (pool, ctx.pool.rows[pos])]
        summary = evaluate_arch(
            cfg["arch"], cfg["arch_kwargs"],
            lambda gen: mixed_batches(inputs, sources, train_cfg.batch, seed, cache_mb),
            inputs, int(real.attrs["patch_size"]), len(real.class_names), train_cfg,
            int(cfg["runs"]), seed, aug, setting="select.augment_study.train.epochs")
        fid = frechet_distance(real_feats, ctx.pool.features[pos]) if k > 1 else None
        row = {"setting": name, "ratio": ratio, "synthetic_per_class": k,
               **{m: summary[m] for m in ("acc", "f1", "sensitivity", "specificity", "auc")},
               "fid_in_domain": fid, "train_time_s": summary["train_time_s"]}
        log.info("%s at %.0f%% (%d per class): acc %.4f, f1 %.4f, fid %s", name, 100 * ratio, k,
                 row["acc"]["mean"], row["f1"]["mean"], fid)
        results.append(row)
    result = {"dataset": dataset, "selector": selector_method, "fraction": float(cfg["fraction"]),
              "real_per_class": k_real, "arch": cfg["arch"], "pool": str(pool_path),
              "candidates": len(ctx.pool.rows), "n_real_fid": len(real_feats), "settings": results,
              "config": {"select": sel_cfg, "augment_study": cfg, "seed": seed},
              "versions": versions()}
    write_json(out, result)
    return result
