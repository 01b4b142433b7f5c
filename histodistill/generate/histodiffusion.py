"""HistoDiffusion (Ye et al., MICCAI 2023, karenyyy/HistoDiffAug): an unconditional latent
diffusion model pre-trained on unlabelled patches, made class-aware on the small labelled set
without touching the diffusion model.

* Rule ``finetune_decoder``: with encoder and diffusion model frozen, the decoder is fine-tuned on
  the labelled training split with L_rec + lambda_CE * CE(phi(D(z)), y), where phi is an
  auxiliary image classifier first trained on the same patches and then frozen, so decoded
  images keep the features that tell the classes apart.
* Rule ``train_latent_classifier``: a time-dependent classifier p(y | z_t, t) on noised latents
  (the autoencoder's encoder architecture with timestep embeddings in its residual blocks,
  followed by attention pooling, as guided diffusion's ``EncoderUNetModel`` with
  ``pool='attention'`` that HistoDiffusion uses), trained with cross-entropy at uniform t.
* Guided sampling (:func:`guidance_grad`): eps_hat = eps - g sqrt(1 - alpha_bar_t)
  grad log p(y | z_t), the DDIM form of mu_hat = mu + g Sigma grad log p.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from histodistill import models
from histodistill.data.real import Stats
from histodistill.data.store import PatchStore
from histodistill.generate.autoencoder import AutoencoderKL, Encoder, load_autoencoder
from histodistill.generate.data import PatchSource, sources
from histodistill.generate.diffusion import Schedule, timestep_embedding
from histodistill.runtime import Compute, device
from histodistill.generate.train import TrainState, fit, inputs_key, save_model, seeded
from histodistill.state import Checkpoint, load_input

log = logging.getLogger(__name__)
DECODER_KEYS = ("decoder.", "post_quant_conv.")


class AttentionPool(nn.Module):
    """CLIP's attention pooling: the mean token (plus positional embeddings) attends over the
    spatial tokens; its output is projected to the logits."""

    def __init__(self, size: int, channels: int, heads: int, out: int) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(size * size + 1, channels) / channels ** 0.5)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, out)
        self.heads = heads if channels % heads == 0 else 1

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, c = h.shape[:2]
        x = h.flatten(2).transpose(1, 2)
        x = torch.cat([x.mean(1, keepdim=True), x], 1) + self.pos
        q, k, v = self.qkv(x).reshape(b, -1, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q[:, :, :1], k, v)
        return self.proj(out.transpose(1, 2).reshape(b, c))


class LatentClassifier(nn.Module):
    """p(y | z_t, t): the autoencoder's encoder over latents, with a timestep embedding
    (sinusoidal, then a two-layer MLP) added in every residual block, then attention pooling."""

    def __init__(self, z_channels: int, latent_size: int, num_classes: int, *, ch: int,
                 ch_mult: list[int], num_res_blocks: int, heads: int) -> None:
        super().__init__()
        self.ch = ch
        self.temb = nn.Sequential(nn.Linear(ch, 4 * ch), nn.SiLU(), nn.Linear(4 * ch, 4 * ch))
        self.encoder = Encoder(z_channels, ch, ch_mult, num_res_blocks, 1, 4 * ch)
        with torch.no_grad():
            size = self.encoder.features(torch.zeros(1, z_channels, latent_size, latent_size),
                                         torch.zeros(1, 4 * ch)).shape[-1]
        self.pool = AttentionPool(size, self.encoder.channels, heads, num_classes)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.pool(self.encoder.features(z, self.temb(timestep_embedding(t, self.ch))))


def build_classifier(cfg: dict[str, Any], z_channels: int, latent_size: int,
                     num_classes: int) -> LatentClassifier:
    return LatentClassifier(z_channels, latent_size, num_classes, ch=int(cfg["ch"]),
                            ch_mult=[int(m) for m in cfg["ch_mult"]],
                            num_res_blocks=int(cfg["num_res_blocks"]), heads=int(cfg["heads"]))


def load_classifier(path: str | os.PathLike, dev: torch.device
                    ) -> tuple[LatentClassifier, dict[str, Any]]:
    saved = load_input(path, "train_latent_classifier")
    clf = build_classifier(saved["config"], saved["z_channels"], saved["latent_size"],
                           len(saved["class_names"]))
    clf.load_state_dict(saved["state"])
    return clf.to(dev).eval().requires_grad_(False), saved


def guidance_grad(clf: LatentClassifier, y: torch.Tensor):  # noqa: ANN201 (a GradFn)
    """grad_z log p(y | z_t, t) of the latent classifier (for :meth:`Schedule.sample`)."""

    def grad(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            logp = F.log_softmax(clf(z, t), -1)[torch.arange(len(z)), y]
            return torch.autograd.grad(logp.sum(), z)[0]

    return grad


def train_latent_classifier(store: str | os.PathLike, autoencoder: str | os.PathLike,
                            out: str | os.PathLike, *, cfg: dict[str, Any],
                            schedule_cfg: dict[str, Any], seed: int,
                            checkpoint: str | os.PathLike | None = None,
                            checkpoint_every: int, cache_mb: float,
                            stop_after: int | None = None, progress: bool = True
                            ) -> LatentClassifier:
    """Cross-entropy on latents of the labelled training split noised to a uniform t under the
    generator's schedule; AdamW with linearly annealed learning rate (guided diffusion's
    ``classifier_train.py`` with ``anneal_lr``, as HistoDiffusion trains it); the forward pass and
    loss under ``cfg['compute']`` (:class:`histodistill.runtime.Compute`)."""
    dev = device()
    ae = load_autoencoder(autoencoder, dev)
    data = PatchSource(sources(store), cache_mb, seed, dev, "train_latent_classifier")
    clf = seeded(seed, lambda: build_classifier(cfg, ae.z_channels, ae.latent_size,
                                                data.num_classes)).to(dev)
    compute = Compute.of(dev, cfg["compute"])
    compute.model(clf)
    steps = int(cfg["steps"])
    opt = torch.optim.AdamW(clf.parameters(), lr=float(cfg["lr"]),
                            weight_decay=float(cfg["weight_decay"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(1.0 - s / steps, 0.0))
    schedule = Schedule.from_config(schedule_cfg)
    gen = torch.Generator().manual_seed(seed)
    key = inputs_key({"classifier": cfg, "schedule": schedule_cfg, "seed": seed},
                     [store], [autoencoder])
    state = TrainState({"clf": clf}, {"clf": opt}, gen, key, data, schedulers={"clf": sched})
    batch = int(cfg["batch"])

    def step(_: int) -> dict[str, float]:
        x, y = data.batch(batch)
        with torch.no_grad():
            z = ae.latents(x, gen)
            t = torch.randint(schedule.timesteps, (batch,), generator=gen)
            z_t = schedule.q_sample(z, t, torch.randn(z.shape, generator=gen).to(dev))
        with compute.autocast():
            logits = clf(compute.inputs(z_t), t.to(dev))
            loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item(), "acc": float((logits.argmax(1) == y).float().mean())}

    seconds = fit(state, step, steps, checkpoint, checkpoint_every, "latent_classifier",
                  stop_after=stop_after, progress=progress)
    if state.step >= steps:
        save_model(out, {"kind": "latent_classifier", "config": cfg, "state": clf.state_dict(),
                         "z_channels": ae.z_channels, "latent_size": ae.latent_size,
                         "class_names": data.class_names, "schedule": schedule_cfg,
                         "history": state.history, "seconds": seconds, "device": str(dev)})
        Checkpoint(checkpoint, state.key).remove()
    return clf


def apply_decoder(ae: AutoencoderKL, path: str | os.PathLike) -> AutoencoderKL:
    """Load the fine-tuned decoder of ``finetune_decoder`` into ``ae`` (in place)."""
    saved = load_input(path, "finetune_decoder")
    missing = [k for k in ae.state_dict() if k.startswith(DECODER_KEYS) and k not in saved["decoder"]]
    if missing:
        raise ValueError(f"{path} holds no fine-tuned weights for {missing[:3]}")
    ae.load_state_dict(saved["decoder"], strict=False)
    return ae


def finetune_decoder(store: str | os.PathLike, autoencoder: str | os.PathLike,
                     out: str | os.PathLike, *, cfg: dict[str, Any], seed: int,
                     checkpoint: str | os.PathLike | None = None, checkpoint_every: int,
                     cache_mb: float, stop_after: int | None = None,
                     progress: bool = True) -> AutoencoderKL:
    """First ``aux.steps`` steps train the auxiliary classifier phi (``aux.net`` from the model
    registry, on normalised pixels; SGD as the evaluation protocol); then phi is frozen and
    ``steps`` steps train the decoder (Adam, betas 0.5, 0.9, as the autoencoder) on
    L1(D(z), x) + lambda_ce * CE(phi(D(z)), y) with z a posterior sample of the frozen encoder;
    the forward passes and losses under ``cfg['compute']`` (:class:`histodistill.runtime.Compute`).
    Returns the autoencoder with the fine-tuned decoder."""
    dev = device()
    ae = load_autoencoder(autoencoder, dev)
    data = PatchSource(sources(store), cache_mb, seed, dev, "finetune_decoder")
    stats = Stats.from_store(PatchStore(store))
    aux_cfg = cfg["aux"]
    aux = seeded(seed, lambda: models.build(aux_cfg["net"], data.num_classes, data.image_size,
                                            **aux_cfg["net_kwargs"])).to(dev)
    compute = Compute.of(dev, cfg["compute"])
    compute.model(ae)
    compute.model(aux)
    params = ae.decoder_parameters()
    for p in params:
        p.requires_grad_(True)
    opts = {"aux": torch.optim.SGD(aux.parameters(), lr=float(aux_cfg["lr"]), momentum=0.9,
                                   weight_decay=5e-4),
            "decoder": torch.optim.Adam(params, lr=float(cfg["lr"]), betas=(0.5, 0.9))}
    gen = torch.Generator().manual_seed(seed)
    key = inputs_key({"finetune": cfg, "seed": seed}, [store], [autoencoder])
    state = TrainState({"ae": ae, "aux": aux}, opts, gen, key, data)
    aux_steps, steps = int(aux_cfg["steps"]), int(cfg["steps"])
    batch, lam = int(cfg["batch"]), float(cfg["lambda_ce"])

    def phi(images: torch.Tensor) -> torch.Tensor:
        return aux(compute.inputs(stats.normalise((images + 1) / 2)))

    def step(i: int) -> dict[str, float]:
        x, y = data.batch(batch)
        x = compute.inputs(x)
        ae.eval()  # frozen encoder; group norm only, so the mode changes nothing but intent
        if i < aux_steps:
            with compute.autocast():
                loss = F.cross_entropy(logits := phi(x), y)
            opts["aux"].zero_grad(set_to_none=True)
            loss.backward()
            opts["aux"].step()
            return {"aux_ce": loss.item(), "aux_acc": float((logits.argmax(1) == y).float().mean())}
        aux.eval().requires_grad_(False)
        with torch.no_grad(), compute.autocast():
            z = ae.encode(x).sample(gen)
        with compute.autocast():
            xrec = ae.decode(z)
            rec = (xrec - x).abs().mean()
            logits = phi(xrec.clamp(-1, 1))
            ce = F.cross_entropy(logits, y)
            loss = rec + lam * ce
        opts["decoder"].zero_grad(set_to_none=True)
        loss.backward()
        opts["decoder"].step()
        return {"rec": rec.item(), "ce": ce.item(),
                "acc": float((logits.argmax(1) == y).float().mean())}

    seconds = fit(state, step, aux_steps + steps, checkpoint, checkpoint_every,
                  "finetune_decoder", stop_after=stop_after, progress=progress)
    ae.eval().requires_grad_(False)
    if state.step >= aux_steps + steps:
        decoder = {k: v for k, v in ae.state_dict().items() if k.startswith(DECODER_KEYS)}
        save_model(out, {"kind": "decoder_ft", "config": cfg, "decoder": decoder,
                         "class_names": data.class_names, "history": state.history,
                         "seconds": seconds, "device": str(dev),
                         "autoencoder": Path(autoencoder).name})
        Checkpoint(checkpoint, state.key).remove()
    return ae
