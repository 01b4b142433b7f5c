"""Rule ``train_generator``: U-ViT latent diffusion on latents of the frozen autoencoder,
through the shared resumable loop (:func:`histodistill.generate.train.fit`).

``cond`` (InfoDist): class-conditional on the labelled training split, with label dropout so one
network also predicts the unconditional noise that classifier-free guidance needs. ``uncond``
(HistoDiffusion's pre-training on unlabelled patches): no labels, the training split and every
patch of the pooled stores (``generate.pretrain``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from histodistill.generate import uvit
from histodistill.generate.autoencoder import load_autoencoder
from histodistill.generate.data import PatchSource, Sources, sources
from histodistill.generate.diffusion import Schedule
from histodistill.runtime import Compute, device
from histodistill.generate.train import (TrainState, fit, inputs_key, save_model, seeded,
                                         warmup)
from histodistill.state import Checkpoint, load_input

log = logging.getLogger(__name__)


def load_uvit(path: str | os.PathLike, dev: torch.device) -> tuple[uvit.UViT, dict[str, Any]]:
    """The EMA weights of a trained U-ViT, frozen, and its saved metadata."""
    saved = load_input(path, "train_generator")
    net = uvit.build(saved["config"], saved["z_channels"], saved["latent_size"],
                     saved["num_classes"])
    net.load_state_dict(saved["ema"])
    return net.to(dev).eval().requires_grad_(False), saved


def train_generator(store: str | os.PathLike, autoencoder: str | os.PathLike,
                    out: str | os.PathLike, *, cfg: dict[str, Any], mode: str, seed: int,
                    pretrain: Sources | None = None, checkpoint: str | os.PathLike | None = None,
                    checkpoint_every: int, cache_mb: float,
                    stop_after: int | None = None, progress: bool = True) -> TrainState:
    """U-ViT latent diffusion, DDPM epsilon-prediction at T steps: AdamW with U-ViT's linear
    warm-up, EMA weights (saved for sampling), the forward pass and loss under ``cfg['compute']``
    (:class:`histodistill.runtime.Compute`). ``mode`` ``cond``: class-conditional with label
    dropout ``label_dropout`` (the null label); ``uncond``: no labels, pooled stores included."""
    if mode not in ("cond", "uncond"):
        raise ValueError(f"generator mode must be cond or uncond, got {mode!r}")
    dev = device()
    ae = load_autoencoder(autoencoder, dev)
    src = sources(store, pretrain if mode == "uncond" else None)
    data = PatchSource(src, cache_mb, seed, dev, "train_generator")
    classes = data.num_classes if mode == "cond" else 0
    net = seeded(seed, lambda: uvit.build(cfg, ae.z_channels, ae.latent_size, classes)).to(dev)
    compute = Compute.of(dev, cfg["compute"])
    compute.model(net)
    beta1, beta2 = (float(b) for b in cfg["betas"])  # two (the schema's)
    opt = torch.optim.AdamW(net.parameters(), lr=float(cfg["lr"]),
                            weight_decay=float(cfg["weight_decay"]), betas=(beta1, beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup(int(cfg["warmup"])))
    schedule = Schedule.from_config(cfg["schedule"])
    gen = torch.Generator().manual_seed(seed)
    key = inputs_key({"generator": cfg, "mode": mode, "seed": seed, "sources": src},
                     [p for p, _ in src], [autoencoder])
    state = TrainState({"net": net}, {"net": opt}, gen, key, data, float(cfg["ema"]),
                       {"net": sched})
    batch, dropout = int(cfg["batch"]), float(cfg["label_dropout"])

    def step(_: int) -> dict[str, float]:
        x, y = data.batch(batch)
        with torch.no_grad():
            z = ae.latents(x, gen)
        if classes:
            drop = (torch.rand(batch, generator=gen) < dropout).to(dev)
            y = torch.where(drop, torch.full_like(y, net.null_label), y)
        with compute.autocast():
            if classes:
                loss = schedule.loss(lambda zt, t: net(compute.inputs(zt), t, y), z, gen)
            else:
                loss = schedule.loss(lambda zt, t: net(compute.inputs(zt), t), z, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    seconds = fit(state, step, int(cfg["steps"]), checkpoint, checkpoint_every, f"uvit_{mode}",
                  stop_after=stop_after, progress=progress)
    if state.step >= int(cfg["steps"]):
        save_model(out, {"kind": "uvit", "mode": mode, "config": cfg, "ema": state.ema["net"].state_dict(),
                         "num_classes": classes, "class_names": data.class_names,
                         "z_channels": ae.z_channels, "latent_size": ae.latent_size,
                         "image_size": data.image_size, "history": state.history,
                         "seconds": seconds, "device": str(dev),
                         "autoencoder": Path(autoencoder).name})
        Checkpoint(checkpoint, state.key).remove()
    return state
