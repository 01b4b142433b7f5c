"""Rules ``train_autoencoder`` and ``train_generator``: the latent autoencoder and the U-ViT
latent diffusion model, trained on patches streamed from the stores through the shared
resumable loop (:func:`histodistill.generate.train.fit`).

Training data: the dataset's training split, and for the autoencoder and the unconditional
generator (HistoDiffusion's pre-training on unlabelled patches) also every patch of the pooled
stores (``generate.pretrain``). The class-conditional generator (InfoDist) trains on the labelled
training split with label dropout, so one network also predicts the unconditional noise that
classifier-free guidance needs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from histodistill.generate import uvit
from histodistill.generate.autoencoder import AutoencoderKL, AutoencoderLoss, latent_scale
from histodistill.generate.data import PatchSource
from histodistill.generate.diffusion import Schedule
from histodistill.generate.train import (TrainState, device, finish, fit, inputs_key, save_model,
                                         warmup)

log = logging.getLogger(__name__)
Sources = list[tuple[str, list[str]]]


def sources(store: str | os.PathLike, pretrain: Sources | None = None) -> Sources:
    """The dataset's training split, then the pooled stores' splits."""
    return [(str(store), ["train"]), *[(str(p), list(s)) for p, s in (pretrain or [])]]


def pooled(stores: list[str]) -> Sources:
    """Pooled stores with every split (their labels are not used)."""
    return [(str(s), ["train", "val", "test"]) for s in stores]


def seeded(seed: int, build: Any) -> Any:
    """``build()`` under a fixed torch seed, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def load_autoencoder(path: str | os.PathLike, dev: torch.device) -> AutoencoderKL:
    """The trained autoencoder of ``train_autoencoder``, frozen, in eval mode."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
    ae = AutoencoderKL.from_config(saved["config"], saved["image_size"])
    ae.load_state_dict(saved["state"])
    return ae.to(dev).eval().requires_grad_(False)


def train_autoencoder(store: str | os.PathLike, out: str | os.PathLike, cfg: dict[str, Any],
                      seed: int, pretrain: Sources | None = None,
                      checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 1000,
                      cache_mb: float = 1024, stop_after: int | None = None,
                      progress: bool = True) -> AutoencoderKL | None:
    """LDM's KL autoencoder: Adam (betas 0.5, 0.9) on the autoencoder and the learned
    log-variance, a second Adam on the discriminator once it is switched on. After training,
    ``scale_factor`` = 1 / std of the latents of ``scale_batches`` batches (LDM's scale_by_std)."""
    dev = device()
    src = sources(store, pretrain)
    data = PatchSource(src, cache_mb, seed, dev, "train_autoencoder")
    ae = seeded(seed, lambda: AutoencoderKL.from_config(cfg, data.image_size)).to(dev)
    loss = seeded(seed + 1, lambda: AutoencoderLoss(cfg)).to(dev)
    loss.check_size(data.image_size)
    lr, betas = float(cfg["lr"]), (0.5, 0.9)
    opts = {"ae": torch.optim.Adam([*ae.parameters(), loss.logvar], lr=lr, betas=betas)}
    if loss.discriminator is not None:
        opts["disc"] = torch.optim.Adam(loss.discriminator.parameters(), lr=lr, betas=betas)
    gen = torch.Generator().manual_seed(seed)
    key = inputs_key({"autoencoder": cfg, "seed": seed, "sources": src},
                     [p for p, _ in src], [])
    state = TrainState({"ae": ae, "loss": loss}, opts, gen, key, data)
    batch = int(cfg["batch"])

    def step(i: int) -> dict[str, float]:
        x, _ = data.batch(batch)
        posterior = ae.encode(x)
        xrec = ae.decode(posterior.sample(gen))
        total, logs = loss.generator(x, xrec, posterior, i, ae.decoder.conv_out.weight)
        opts["ae"].zero_grad(set_to_none=True)
        total.backward()
        opts["ae"].step()
        if loss.discriminator is not None and i >= loss.disc_start:
            d = loss.discriminator_loss(x, xrec)
            opts["disc"].zero_grad(set_to_none=True)
            d.backward()
            opts["disc"].step()
            logs["disc"] = d.item()
        return logs

    seconds = fit(state, step, int(cfg["steps"]), checkpoint, checkpoint_every, "autoencoder",
                  stop_after=stop_after, progress=progress)
    if state.step < int(cfg["steps"]):
        return None
    ae.eval()
    with torch.no_grad():
        z = torch.cat([ae.encode(data.batch(batch)[0]).sample(gen)
                       for _ in range(int(cfg.get("scale_batches", 8)))])
        ae.scale_factor.fill_(latent_scale(float(z.flatten().std())))
    log.info("latent %s x %d x %d, scale factor %.4f", ae.z_channels, ae.latent_size,
             ae.latent_size, float(ae.scale_factor))
    save_model(out, {"kind": "autoencoder", "config": cfg, "image_size": data.image_size,
                     "state": ae.state_dict(), "class_names": data.class_names,
                     "history": state.history, "seconds": seconds, "device": str(dev)})
    finish(checkpoint)
    return ae


def load_uvit(path: str | os.PathLike, dev: torch.device) -> tuple[uvit.UViT, dict[str, Any]]:
    """The EMA weights of a trained U-ViT, frozen, and its saved metadata."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
    net = uvit.build(saved["config"], saved["z_channels"], saved["latent_size"],
                     saved["num_classes"])
    net.load_state_dict(saved["ema"])
    return net.to(dev).eval().requires_grad_(False), saved


def train_generator(store: str | os.PathLike, autoencoder: str | os.PathLike,
                    out: str | os.PathLike, cfg: dict[str, Any], mode: str, seed: int,
                    pretrain: Sources | None = None, checkpoint: str | os.PathLike | None = None,
                    checkpoint_every: int = 1000, cache_mb: float = 1024,
                    stop_after: int | None = None, progress: bool = True) -> TrainState:
    """U-ViT latent diffusion, DDPM epsilon-prediction at T steps: AdamW with U-ViT's linear
    warm-up, EMA weights (saved for sampling). ``mode`` ``cond``: class-conditional with label
    dropout ``label_dropout`` (the null label); ``uncond``: no labels, pooled stores included."""
    if mode not in ("cond", "uncond"):
        raise ValueError(f"generator mode must be cond or uncond, got {mode!r}")
    dev = device()
    ae = load_autoencoder(autoencoder, dev)
    src = sources(store, pretrain if mode == "uncond" else None)
    data = PatchSource(src, cache_mb, seed, dev, "train_generator")
    classes = data.num_classes if mode == "cond" else 0
    net = seeded(seed, lambda: uvit.build(cfg, ae.z_channels, ae.latent_size, classes)).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=float(cfg["lr"]),
                            weight_decay=float(cfg["weight_decay"]),
                            betas=tuple(float(b) for b in cfg["betas"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup(int(cfg["warmup"])))
    schedule = Schedule.from_config(cfg["schedule"])
    gen = torch.Generator().manual_seed(seed)
    key = inputs_key({"generator": cfg, "mode": mode, "seed": seed, "sources": src},
                     [p for p, _ in src], [autoencoder])
    state = TrainState({"net": net}, {"net": opt}, gen, key, data, float(cfg["ema"]),
                       {"net": sched})
    batch, dropout = int(cfg["batch"]), float(cfg.get("label_dropout", 0.0))

    def step(_: int) -> dict[str, float]:
        x, y = data.batch(batch)
        with torch.no_grad():
            z = ae.latents(x, gen)
        if classes:
            drop = (torch.rand(batch, generator=gen) < dropout).to(dev)
            y = torch.where(drop, torch.full_like(y, net.null_label), y)
            loss = schedule.loss(lambda zt, t: net(zt, t, y), z, gen)
        else:
            loss = schedule.loss(lambda zt, t: net(zt, t), z, gen)
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
        finish(checkpoint)
    return state
