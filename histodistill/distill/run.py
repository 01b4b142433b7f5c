"""Run a distillation method on a patch store and write the distilled set, its image grid and
its cost; pre-train Histo-DD's network pool."""

from __future__ import annotations

import logging
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from PIL import Image

from histodistill import models
from histodistill.distill.base import Context, build
from histodistill.evaluate import TrainConfig, device, train
from histodistill.io import atomic_path, write_json
from histodistill.stain import StainTemplate
from histodistill.store import PatchStore, load_split

log = logging.getLogger(__name__)


def load_train(store_path: str | os.PathLike, max_per_class: int, seed: int
               ) -> tuple[PatchStore, torch.Tensor, torch.Tensor]:
    """The store's training split as float images in [0, 1] and labels, on the device."""
    store = PatchStore(store_path)
    x, y, _ = load_split(store, "train", max_per_class, seed)
    dev = device()
    return store, torch.from_numpy(x).to(dev).float().div_(255), torch.from_numpy(y).to(dev)


def pretrain_pool(store_path: str | os.PathLike, out: str | os.PathLike, cfg: dict[str, Any],
                  seed: int, max_per_class: int = 0) -> None:
    """Train ``cfg['size']`` networks ``cfg['net']`` on the real data from different seeded
    initialisations (Histo-DD's pool of early-stage networks) and save their weights."""
    store, x, y = load_train(store_path, max_per_class, seed)
    states = []
    for k in range(int(cfg["size"])):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + k)
            net = models.build(cfg["net"], len(store.class_names), x.shape[-1],
                               **cfg.get("net_kwargs", {})).to(x.device)
        times = train(net, x, y, TrainConfig.from_config(cfg["train"]),
                      torch.Generator().manual_seed(seed * 1000 + k))
        log.info("pool network %d/%d trained (%.1fs)", k + 1, cfg["size"], sum(times))
        states.append({n: t.detach().cpu() for n, t in net.state_dict().items()})
    with atomic_path(out) as tmp:
        torch.save({"net": cfg["net"], "net_kwargs": cfg.get("net_kwargs", {}), "states": states}, tmp)


def peak_memory_mb() -> float:
    """Peak memory of this run: GPU memory on CUDA, otherwise the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def distill(store_path: str | os.PathLike, template_path: str | os.PathLike | None,
            pool_path: str | os.PathLike | None, method: str, ipc: int, cfg: dict[str, Any],
            seed: int, out_zarr: str | os.PathLike, out_png: str | os.PathLike,
            out_json: str | os.PathLike, checkpoint: str | os.PathLike | None,
            max_per_class: int = 0, progress: bool = True) -> None:
    """Distil ``ipc`` images per class with ``method`` and write set, grid and cost."""
    store, x, y = load_train(store_path, max_per_class, seed)
    template = StainTemplate.load(template_path) if template_path else None
    pool = torch.load(pool_path, map_location=x.device) if pool_path else {}
    ctx = Context(x, y, len(store.class_names), seed, template,
                  Path(checkpoint) if checkpoint else None, pool, progress)
    start = time.perf_counter()
    images, labels = build(method, cfg, ipc, ctx).run()
    seconds = time.perf_counter() - start
    images8 = (images.detach().cpu().clamp(0, 1) * 255).round().byte().numpy()
    attrs = {"method": method, "ipc": ipc, "seed": seed, "config": cfg,
             "source_store": str(store_path), "class_names": store.class_names,
             "patch_size": int(images8.shape[-1])}
    with atomic_path(out_zarr) as tmp:
        group = zarr.open_group(str(tmp), mode="w")
        group.create_array("images", data=images8, chunks=images8.shape)
        group.create_array("labels", data=labels.cpu().numpy().astype(np.int64))
        group.attrs.update(attrs)
    save_grid(images8, labels.cpu().numpy(), store.class_names, out_png)
    write_json(out_json, {"seconds": seconds, "peak_mem_mb": peak_memory_mb(),
                          "device": str(x.device)})
    if checkpoint and Path(checkpoint).exists():
        Path(checkpoint).unlink()  # finished: the result supersedes the checkpoint


def save_grid(images: np.ndarray, labels: np.ndarray, class_names: list[str],
              path: str | os.PathLike, cell: int = 64) -> None:
    """One row per class of (N, 3, H, W) uint8 images, each scaled to ``cell`` pixels."""
    rows = []
    per_class = [images[labels == c] for c in range(len(class_names))]
    width = max(len(p) for p in per_class)
    for imgs in per_class:
        row = np.full((cell, cell * width, 3), 255, np.uint8)
        for k, img in enumerate(imgs):
            tile = Image.fromarray(img.transpose(1, 2, 0)).resize((cell, cell), Image.Resampling.NEAREST)
            row[:, k * cell:(k + 1) * cell] = np.asarray(tile)
        rows.append(row)
    with atomic_path(path) as tmp:
        Image.fromarray(np.concatenate(rows, 0)).save(tmp, format="PNG")
