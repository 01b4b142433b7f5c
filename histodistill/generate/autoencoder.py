"""Rule ``train_autoencoder``: the KL-regularised latent autoencoder of latent diffusion
(Rombach et al. 2022, CompVis/latent-diffusion ``AutoencoderKL``) and its training loss (LDM's
``LPIPSWithDiscriminator``, after taming-transformers), trained on the dataset's training split
and every patch of the pooled stores (``generate.pretrain``).

Encoder and decoder are LDM's: residual blocks with group norm and SiLU, one stride-2
convolution per downsampling level (``ch_mult`` has log2(downsample) + 1 levels), a middle
block with self-attention, and a diagonal Gaussian posterior over ``z_channels`` latent channels.
Images are in [-1, 1]. The loss is L1 reconstruction (plus an optional perceptual term) under a
learned log-variance, a small KL weight, and a PatchGAN discriminator (hinge loss) switched on at
``disc_start`` with LDM's adaptive weight; ``disc_weight`` 0 leaves it out.

The perceptual term is LPIPS-VGG (Zhang et al. 2018): no weights can be downloaded here, so it is
off unless ``perceptual.vgg`` names a local torchvision VGG16 state dict; ``perceptual.lpips``
may name LPIPS's linear-layer weights (``vgg.pth`` of the lpips package), without which the
channel-normalised feature distances are averaged (LPIPS's "baseline" variant).

The encoder doubles as the body of HistoDiffusion's time-dependent latent classifier: residual
blocks take an optional timestep embedding (``temb_channels``), as LDM's do.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from histodistill.runtime import Compute, device
from histodistill.generate.data import PatchSource, Sources, sources
from histodistill.generate.train import TrainState, fit, inputs_key, save_model, seeded
from histodistill.io import InputError
from histodistill.state import Checkpoint, load_input

STAGE = "train_autoencoder"
log = logging.getLogger(__name__)


def groups(channels: int) -> int:
    """Group-norm groups: LDM's 32 at width >= 128, about 4 channels per group below."""
    g = min(32, max(1, channels // 4))
    while channels % g:
        g -= 1
    return g


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups(channels), channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """Norm, SiLU, 3x3 conv, (+ timestep projection), norm, SiLU, dropout, 3x3 conv; residual."""

    def __init__(self, cin: int, cout: int, temb_channels: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, cout) if temb_channels else None
        self.norm2, self.drop = norm(cout), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.temb_proj is not None:
            assert temb is not None, "a block with a timestep projection takes temb"
            h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over spatial positions (LDM's middle block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 convolution with LDM's asymmetric (0, 1, 0, 1) padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Encoder(nn.Module):
    """LDM's encoder: ``len(ch_mult) - 1`` downsamplings to ``out_channels`` maps."""

    def __init__(self, in_channels: int, ch: int, ch_mult: list[int], num_res_blocks: int,
                 out_channels: int, temb_channels: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        layers: list[nn.Module] = []
        c = ch
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(c, ch * mult, temb_channels, dropout))
                c = ch * mult
            if level + 1 < len(ch_mult):
                layers.append(Downsample(c))
        layers += [ResBlock(c, c, temb_channels, dropout), AttnBlock(c),
                   ResBlock(c, c, temb_channels, dropout)]
        self.layers = nn.ModuleList(layers)
        self.norm_out = norm(c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)
        self.channels = c

    def features(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """The last block's maps, normalised and activated (before ``conv_out``)."""
        h = self.conv_in(x)
        for layer in self.layers:
            h = layer(h, temb)
        return F.silu(self.norm_out(h))

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv_out(self.features(x, temb))


class Decoder(nn.Module):
    """LDM's decoder, mirroring the encoder; upsampling restores the encoder's exact sizes."""

    def __init__(self, out_channels: int, ch: int, ch_mult: list[int], num_res_blocks: int,
                 z_channels: int, image_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.sizes = [image_size]
        for _ in ch_mult[1:]:
            self.sizes.append((self.sizes[-1] + 1 - 3) // 2 + 1)  # Downsample's output size
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = nn.ModuleList([ResBlock(c, c, 0, dropout), AttnBlock(c), ResBlock(c, c, 0, dropout)])
        self.up = nn.ModuleList()
        for level in reversed(range(len(ch_mult))):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(c, ch * ch_mult[level], 0, dropout))
                c = ch * ch_mult[level]
            self.up.append(nn.ModuleDict({"blocks": blocks,
                                          "upsample": Upsample(c) if level else nn.Identity()}))
        self.norm_out = norm(c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def first(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's first part: input convolution and middle blocks, at latent resolution."""
        h = self.conv_in(z)
        for layer in self.mid:
            h = layer(h)
        return h

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.first(z)
        levels = len(self.up)
        for i, stage in enumerate(self.up):
            assert isinstance(stage, nn.ModuleDict)  # per level: {"blocks": ModuleList, "upsample"}
            blocks = stage["blocks"]
            assert isinstance(blocks, nn.ModuleList)
            for block in blocks:
                h = block(h)
            if i + 1 < levels:
                size = self.sizes[levels - 2 - i]
                h = stage["upsample"](h, (size, size))
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """LDM's posterior: mean and log-variance (clamped to [-30, 20]) split along channels."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.chunk(2, 1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=gen).to(self.mean.device)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL to the standard normal, summed over latent elements: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum((1, 2, 3))


def ch_mult_for(cfg: dict[str, Any]) -> list[int]:
    """``ch_mult`` from the settings, or LDM's for the downsampling factor (f4: [1, 2, 4],
    f8: [1, 2, 4, 4])."""
    down = int(cfg["downsample"])
    mult = cfg["ch_mult"] or {4: [1, 2, 4], 8: [1, 2, 4, 4]}.get(down)
    if mult is None or 2 ** (len(mult) - 1) != down:
        raise ValueError(f"generate.autoencoder: ch_mult {mult} does not give downsampling {down} "
                         f"(it needs log2({down}) + 1 levels)")
    return [int(m) for m in mult]


class AutoencoderKL(nn.Module):
    """Encoder, 1x1 moment projection, decoder; ``scale_factor`` maps posterior samples to unit
    variance for the diffusion model (LDM's ``scale_by_std``), set after training."""

    scale_factor: torch.Tensor  # a buffer (registered in __init__)

    def __init__(self, image_size: int, *, ch: int, ch_mult: list[int], num_res_blocks: int,
                 z_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.encoder = Encoder(3, ch, ch_mult, num_res_blocks, 2 * z_channels, 0, dropout)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)
        self.decoder = Decoder(3, ch, ch_mult, num_res_blocks, z_channels, image_size, dropout)
        self.z_channels = z_channels
        self.latent_size = self.decoder.sizes[-1]
        self.register_buffer("scale_factor", torch.tensor(1.0))

    @classmethod
    def from_config(cls, cfg: dict[str, Any], image_size: int) -> "AutoencoderKL":
        """From ``generate.autoencoder`` settings (LDM's dropout, 0, is not one of them)."""
        return cls(image_size, ch=int(cfg["ch"]), ch_mult=ch_mult_for(cfg),
                   num_res_blocks=int(cfg["num_res_blocks"]), z_channels=int(cfg["z_channels"]))

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def decoder_parameters(self) -> list[nn.Parameter]:
        """What decoder fine-tuning trains: the decoder and its 1x1 input projection."""
        return [*self.post_quant_conv.parameters(), *self.decoder.parameters()]

    def latents(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Scaled posterior samples of images in [-1, 1]: what the diffusion model sees."""
        return self.encode(x).sample(gen) * self.scale_factor

    def first_features(self, z: torch.Tensor) -> torch.Tensor:
        """The generator's intermediate features of scaled latents ``z``: the decoder's first
        part (SLFD conditions its stochastic module on them)."""
        return self.decoder.first(self.post_quant_conv(z / self.scale_factor))

    def images(self, z: torch.Tensor) -> torch.Tensor:
        """Decode scaled latents to images in [-1, 1] (clamped)."""
        return self.decode(z / self.scale_factor).clamp(-1, 1)


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix, taming's ``NLayerDiscriminator``): 4x4 convolutions, ``layers`` of
    them with stride 2, batch norm and LeakyReLU(0.2), one logit per patch."""

    def __init__(self, layers: int = 3, width: int = 64) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = width
        for n in range(1, layers + 1):
            cout = width * min(2 ** n, 8)
            stride = 2 if n < layers else 1
            mods += [nn.Conv2d(c, cout, 4, stride, 1, bias=False), nn.BatchNorm2d(cout),
                     nn.LeakyReLU(0.2, True)]
            c = cout
        mods.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.main = nn.Sequential(*mods)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


VGG_LAYERS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16.features


class Perceptual(nn.Module):
    """LPIPS-VGG distance between images in [-1, 1], from local weight files only."""

    shift: torch.Tensor  # buffers (registered in __init__)
    scale: torch.Tensor

    def __init__(self, vgg_path: str | os.PathLike, lpips_path: str | os.PathLike | None = None
                 ) -> None:
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        features = make_layers(cfgs["D"])[:VGG_LAYERS[-1] + 1]  # VGG16's convolutional part
        state = {k.removeprefix("features."): v for k, v in _load(vgg_path, "perceptual.vgg").items()
                 if k.startswith("features.")}
        try:
            features.load_state_dict(state)
        except RuntimeError as err:
            raise InputError(STAGE, vgg_path, "generate.autoencoder.perceptual.vgg: not a "
                             f"torchvision VGG16 state dict ({str(err).splitlines()[-1].strip()})") from None
        self.features = features.eval().requires_grad_(False)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1))
        self.lins: list[torch.Tensor] | None = None
        if lpips_path:
            state = _load(lpips_path, "perceptual.lpips")
            found = {int(m.group(1)): v for k, v in state.items()
                     if (m := re.search(r"lin(\d)\.model\.1\.weight$", k))}
            if sorted(found) != list(range(len(VGG_LAYERS))):
                raise InputError(STAGE, lpips_path, "expected LPIPS linear layers "
                                 "'lin0.model.1.weight' .. 'lin4.model.1.weight'")
            for k in range(len(VGG_LAYERS)):
                self.register_buffer(f"lin{k}", found[k].float())
            self.lins = [getattr(self, f"lin{k}") for k in range(len(VGG_LAYERS))]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distance (B, 1, 1, 1)."""
        h = torch.cat([x, y])
        h = (h - self.shift) / self.scale
        total = x.new_zeros(len(x), 1, 1, 1)
        k = 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in VGG_LAYERS:
                f = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                d = (f[:len(x)] - f[len(x):]).pow(2)
                d = (d * self.lins[k]).sum(1, keepdim=True) if self.lins else d.mean(1, keepdim=True)
                total = total + d.mean((2, 3), keepdim=True)
                k += 1
        return total


def _load(path: str | os.PathLike, key: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise InputError(STAGE, path, f"generate.autoencoder.{key}: cannot read weights ({err})") from err
    if not isinstance(state, dict):
        raise InputError(STAGE, path, f"generate.autoencoder.{key}: not a state dict")
    return state.get("state_dict", state)


class AutoencoderLoss(nn.Module):
    """LDM's ``LPIPSWithDiscriminator``: NLL of the (L1 [+ perceptual]) reconstruction error
    under a learned log-variance, + ``kl_weight`` KL, + the adaptively weighted generator loss
    once ``step >= disc_start``; the discriminator trains on the hinge loss."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.kl_weight = float(cfg["kl_weight"])
        self.disc_weight = float(cfg["disc_weight"])
        self.disc_start = int(cfg["disc_start"])
        self.logvar = nn.Parameter(torch.zeros(()))
        self.discriminator = (PatchDiscriminator(int(cfg["disc_layers"]))
                              if self.disc_weight > 0 else None)
        perc = cfg["perceptual"]
        self.perceptual_weight = float(perc["weight"])
        self.perceptual = (Perceptual(perc["vgg"], perc["lpips"])
                           if perc["vgg"] and self.perceptual_weight > 0 else None)

    def check_size(self, image_size: int) -> None:
        """The discriminator must leave at least one patch logit at this image size."""
        if self.discriminator is None:
            return
        with torch.no_grad():
            was = self.discriminator.training
            out = self.discriminator.eval()(torch.zeros(1, 3, image_size, image_size))
            self.discriminator.train(was)
        if min(out.shape[-2:]) < 1:
            raise ValueError(f"generate.autoencoder.disc_layers leaves no patch logit at "
                             f"{image_size} px; use fewer layers")

    def reconstruction(self, x: torch.Tensor, xrec: torch.Tensor) -> torch.Tensor:
        """Per-pixel L1 error plus the weighted perceptual distance (broadcast per image)."""
        rec = (x - xrec).abs()
        if self.perceptual is not None:
            rec = rec + self.perceptual_weight * self.perceptual(x, xrec)
        return rec

    def generator(self, x: torch.Tensor, xrec: torch.Tensor, posterior: DiagonalGaussian,
                  step: int, last_layer: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        rec = self.reconstruction(x, xrec)
        nll = (rec / torch.exp(self.logvar) + self.logvar).sum() / len(x)
        kl = posterior.kl().mean()
        loss = nll + self.kl_weight * kl
        logs = {"rec": float(rec.detach().mean()), "kl": float(kl.detach())}
        if self.discriminator is not None and step >= self.disc_start:
            g = -self.discriminator(xrec).mean()
            nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
            g_grad = torch.autograd.grad(g, last_layer, retain_graph=True)[0]
            weight = (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, 1e4).detach()
            loss = loss + self.disc_weight * weight * g
            logs["g"] = float(g.detach())
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, xrec: torch.Tensor) -> torch.Tensor:
        assert self.discriminator is not None, "called once the discriminator is on"
        real, fake = self.discriminator(x.detach()), self.discriminator(xrec.detach())
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def latent_scale(std: float) -> float:
    """LDM's scale_by_std: one over the latents' standard deviation."""
    return 1.0 / max(std, 1e-8) if math.isfinite(std) else 1.0


def load_autoencoder(path: str | os.PathLike, dev: torch.device) -> AutoencoderKL:
    """The trained autoencoder of ``train_autoencoder``, frozen, in eval mode."""
    saved = load_input(path, "train_autoencoder")
    ae = AutoencoderKL.from_config(saved["config"], saved["image_size"])
    ae.load_state_dict(saved["state"])
    return ae.to(dev).eval().requires_grad_(False)


def train_autoencoder(store: str | os.PathLike, out: str | os.PathLike, cfg: dict[str, Any],
                      *, seed: int, pretrain: Sources | None = None,
                      checkpoint: str | os.PathLike | None = None, checkpoint_every: int,
                      cache_mb: float, stop_after: int | None = None,
                      progress: bool = True) -> AutoencoderKL | None:
    """LDM's KL autoencoder: Adam (betas 0.5, 0.9) on the autoencoder and the learned
    log-variance, a second Adam on the discriminator once it is switched on; the forward passes
    and losses under ``cfg['compute']`` (:class:`histodistill.runtime.Compute`). After training,
    ``scale_factor`` = 1 / std of the latents of ``scale_batches`` batches (LDM's scale_by_std)."""
    dev = device()
    src = sources(store, pretrain)
    data = PatchSource(src, cache_mb, seed, dev, "train_autoencoder")
    ae = seeded(seed, lambda: AutoencoderKL.from_config(cfg, data.image_size)).to(dev)
    loss = seeded(seed + 1, lambda: AutoencoderLoss(cfg)).to(dev)
    loss.check_size(data.image_size)
    compute = Compute.of(dev, cfg["compute"])
    compute.model(ae)
    compute.model(loss)
    lr, betas = float(cfg["lr"]), (0.5, 0.9)
    opts: dict[str, torch.optim.Optimizer] = {
        "ae": torch.optim.Adam([*ae.parameters(), loss.logvar], lr=lr, betas=betas)}
    if loss.discriminator is not None:
        opts["disc"] = torch.optim.Adam(loss.discriminator.parameters(), lr=lr, betas=betas)
    gen = torch.Generator().manual_seed(seed)
    key = inputs_key({"autoencoder": cfg, "seed": seed, "sources": src},
                     [p for p, _ in src], [])
    state = TrainState({"ae": ae, "loss": loss}, opts, gen, key, data)
    batch = int(cfg["batch"])

    def step(i: int) -> dict[str, float]:
        x, _ = data.batch(batch)
        x = compute.inputs(x)
        with compute.autocast():
            posterior = ae.encode(x)
            xrec = ae.decode(posterior.sample(gen))
            total, logs = loss.generator(x, xrec, posterior, i, ae.decoder.conv_out.weight)
        opts["ae"].zero_grad(set_to_none=True)
        total.backward()
        opts["ae"].step()
        if loss.discriminator is not None and i >= loss.disc_start:
            with compute.autocast():
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
                       for _ in range(int(cfg["scale_batches"]))])
        ae.scale_factor.fill_(latent_scale(float(z.flatten().std())))
    log.info("latent %s x %d x %d, scale factor %.4f", ae.z_channels, ae.latent_size,
             ae.latent_size, float(ae.scale_factor))
    save_model(out, {"kind": "autoencoder", "config": cfg, "image_size": data.image_size,
                     "state": ae.state_dict(), "class_names": data.class_names,
                     "history": state.history, "seconds": seconds, "device": str(dev)})
    Checkpoint(checkpoint, state.key).remove()
    return ae
