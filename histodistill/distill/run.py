"""Run a distillation method on a patch store and write the distilled set, its image grid and
its cost; pre-train Histo-DD's network pool."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from histodistill import models
from histodistill.augment import Augment, AugmentConfig
from histodistill.data.real import RealData
from histodistill.distill.base import Context, build
from histodistill.runtime import device
from histodistill.training import TrainConfig, train
from histodistill.distilled import peak_memory_mb, to_uint8, write_distilled
from histodistill.io import settings_hash
from histodistill.stain import StainTemplate
from histodistill.data.store import PatchStore, fingerprint
from histodistill.trajectories.store import ExpertStore
from histodistill.state import load_input, save_state

log = logging.getLogger(__name__)


def real_data(store_path: str | os.PathLike, cache_mb: float, seed: int, max_per_class: int = 0
              ) -> RealData:
    """The store's training split, streamed through a bounded class-balanced cache."""
    return RealData(PatchStore(store_path), "train", cache_mb, seed, device(), max_per_class)


def pretrain_pool(store_path: str | os.PathLike, template_path: str | os.PathLike | None,
                  out: str | os.PathLike, *, cfg: dict[str, Any], seed: int, cache_mb: float,
                  max_per_class: int = 0) -> None:
    """Histo-DD's pool of early-stage networks (Acc-DD): ``cfg['size']`` networks ``cfg['net']``
    trained on the real data from different seeded initialisations, with per-image augmentation,
    keeping the weights after each epoch listed in ``save_epochs``. The augmentation is
    distillation's (``all``: stain normalisation to ``template_path`` included), so the pool's
    networks have seen inputs like the ones they are matched on."""
    real = real_data(store_path, cache_mb, seed, max_per_class)
    template = StainTemplate.load(template_path) if template_path else None
    train_cfg = TrainConfig.from_config(cfg["train"])
    save = {int(e) for e in cfg["save_epochs"]}
    if not save or max(save) > train_cfg.epochs or min(save) < 1:
        raise ValueError(f"distill.pool.save_epochs {sorted(save)} must lie in 1..{train_cfg.epochs}")
    aug = Augment(AugmentConfig.from_config(cfg["augment"]), template, real.stats.mean,
                  real.stats.std)
    states = []
    for k in range(int(cfg["size"])):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + k)
            net = models.build(cfg["net"], real.num_classes, real.im_size,
                               **cfg["net_kwargs"]).to(real.device)

        def snapshot(epoch: int, *_: Any) -> None:
            if epoch + 1 in save:
                states.append({n: t.detach().cpu().clone() for n, t in net.state_dict().items()})

        times = train(net, lambda epoch: real.epoch(train_cfg.batch, seed * 1000 + k * 100 + epoch),
                      train_cfg, torch.Generator().manual_seed(seed * 1000 + k), aug,
                      on_epoch=snapshot, progress=True, setting="distill.pool.train.epochs",
                      repeats=int(cfg["size"]) - k)
        log.info("pool network %d/%d trained (%.1fs)", k + 1, cfg["size"], sum(times))
    save_state({"net": cfg["net"], "net_kwargs": cfg["net_kwargs"], "states": states}, out)


def context(store_path: str | os.PathLike, template_path: str | os.PathLike | None,
            pool_path: str | os.PathLike | None, seed: int, *,
            checkpoint: str | os.PathLike | None = None, cache_mb: float,
            max_per_class: int = 0, progress: bool = True,
            experts: str | os.PathLike | None = None,
            autoencoder: str | os.PathLike | None = None) -> Context:
    """What a method runs on: the streamed training split, the template, the pool, the expert
    store and autoencoder paths, and the fingerprint of their contents (the resume key)."""
    real = real_data(store_path, cache_mb, seed, max_per_class)
    template = StainTemplate.load(template_path) if template_path else None
    pool = load_input(pool_path, "pretrain_pool") if pool_path else {}
    inputs = fingerprint(real.store, pool_path, template_path, autoencoder)
    if experts:  # its key covers its settings and data; hashing gigabytes of it would not pay
        store = ExpertStore(experts)
        inputs = settings_hash([inputs, store.key])
        store.close()
    return Context(real, seed, template, Path(checkpoint) if checkpoint else None, pool,
                   progress, inputs, experts=Path(experts) if experts else None,
                   autoencoder=Path(autoencoder) if autoencoder else None)


def distill(method: str, ipc: int, cfg: dict[str, Any], seed: int,
            out: dict[str, str | os.PathLike], *, store_path: str | os.PathLike,
            template_path: str | os.PathLike | None = None,
            pool_path: str | os.PathLike | None = None,
            checkpoint: str | os.PathLike | None = None, cache_mb: float,
            max_per_class: int = 0, progress: bool = True,
            experts: str | os.PathLike | None = None,
            autoencoder: str | os.PathLike | None = None,
            extra_cost: dict[str, Any] | None = None, keep_diverged: bool = False) -> None:
    """Distil ``ipc`` images per class with ``method`` and write the set, its grid and its
    cost (``out``: ``zarr``, ``grid``, ``cost``), reading the patch store, the stain template
    and Histo-DD's ``pool_path``; resumable from ``checkpoint``. ``experts`` is the expert-
    trajectory store of trajectory matching (rule buffer_experts);
    latent methods (GLaD, SLFD) decode through the generator's ``autoencoder``; ``extra_cost``
    joins the cost file (how the settings were chosen). A run whose loss or images stop being
    finite is refused (FloatingPointError, nothing written) unless ``keep_diverged`` (a tuning
    candidate: recorded as diverged, never chosen)."""
    PatchStore(store_path).check_ipc(ipc, "distill")
    ctx = context(store_path, template_path, pool_path, seed, checkpoint=checkpoint,
                  cache_mb=cache_mb, max_per_class=max_per_class, progress=progress,
                  experts=experts, autoencoder=autoencoder)
    real = ctx.real
    start = time.perf_counter()
    distiller = build(method, cfg, ipc, ctx)
    images, labels = distiller.run()
    wall = time.perf_counter() - start
    if distiller.diverged_at is not None and not keep_diverged:
        raise FloatingPointError(
            f"[distill] {method} ipc {ipc}: the loss or the synthetic images stopped being "
            f"finite at iteration {distiller.diverged_at} (the optimisation diverged; a lower "
            f"image learning rate or unit_grad steps keep it stable); nothing was written")
    attrs = {"method": method, "ipc": ipc, "seed": seed, "config": cfg,
             "source_store": str(store_path), "class_names": real.store.class_names}
    write_distilled(to_uint8(images), labels.cpu().numpy(), attrs, out["zarr"], out["grid"],
                    out["cost"],
                    {"seconds": distiller.seconds if distiller.iterations else wall,
                     "image_updates": distiller.image_updates,
                     "iterations": distiller.iterations, "diverged_at": distiller.diverged_at,
                     "peak_mem_mb": peak_memory_mb(), "device": str(real.device),
                     **(extra_cost or {})},
                    distiller.source_rows)
    if checkpoint and Path(checkpoint).exists():
        Path(checkpoint).unlink()  # finished: the result supersedes the checkpoint
