"""DDPM in latent space: noise schedules, forward noising, the epsilon-prediction loss and a DDIM
sampler with classifier-free and classifier guidance.

Timesteps are 0-based: ``t`` in [0, T) noises with ``alpha_bar[t] = prod(1 - beta[:t + 1])``, so
``t = 0`` is one step of noise and the clean latent sits "before" it (alpha_bar = 1).

* ``linear``: LDM's and U-ViT's "linear" schedule, linear in sqrt(beta) from ``beta_start`` to
  ``beta_end`` (Stable Diffusion's 0.00085 to 0.012, which U-ViT's latent models use).
* ``cosine``: Nichol & Dhariwal (2021), alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) pi/2),
  betas clipped at 0.999.

The DDIM step (Song et al. 2021, eq. 12) with ``eta`` interpolating between deterministic DDIM
(0) and ancestral DDPM-like sampling (1). Classifier-free guidance follows U-ViT's convention,
eps = eps_c + s (eps_c - eps_u). Classifier guidance shifts the noise prediction by the scaled
score, eps_hat = eps - g sqrt(1 - alpha_bar_t) grad log p(y | z_t) (Dhariwal & Nichol, Alg. 2):
the DDIM form of mu_hat = mu + g Sigma grad log p, and what HistoDiffusion's DDIM code does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GradFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Schedule:
    """A discrete noise schedule of ``timesteps`` steps (float64 on the CPU; cast on use)."""

    betas: torch.Tensor

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "Schedule":
        """``{kind: linear|cosine, timesteps, beta_start, beta_end, cosine_s}``."""
        kind, steps = cfg["kind"], int(cfg["timesteps"])
        if kind == "linear":
            return cls.linear(timesteps=steps, beta_start=float(cfg["beta_start"]),
                              beta_end=float(cfg["beta_end"]))
        if kind == "cosine":
            return cls.cosine(timesteps=steps, s=float(cfg["cosine_s"]))
        raise ValueError(f"unknown noise schedule {kind!r}; choose linear or cosine")

    @classmethod
    def linear(cls, *, timesteps: int, beta_start: float, beta_end: float) -> "Schedule":
        """Linear in sqrt(beta) (LDM's and U-ViT's ``linear``)."""
        root = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, timesteps, dtype=torch.float64)
        return cls(root ** 2)

    @classmethod
    def cosine(cls, *, timesteps: int, s: float) -> "Schedule":
        """Nichol & Dhariwal's cosine schedule."""
        t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]
        return cls((1 - abar[1:] / abar[:-1]).clamp(max=0.999))

    @property
    def timesteps(self) -> int:
        return len(self.betas)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(1 - self.betas, 0)

    def abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar at integer timesteps ``t`` (-1 means clean: 1), shaped to broadcast."""
        table = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
        values = table[(t.cpu() + 1).long()].to(like.device, like.dtype)
        return values.reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) noise."""
        a = self.abar(t, z0)
        return a.sqrt() * z0 + (1 - a).sqrt() * noise

    def loss(self, eps_fn: EpsFn, z0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """DDPM's simple loss: mean squared error of the predicted noise at a uniform t."""
        t = torch.randint(self.timesteps, (len(z0),), generator=gen)
        noise = randn(z0.shape, gen, z0)
        z_t = self.q_sample(z0, t, noise)
        return (eps_fn(z_t, t.to(z0.device)) - noise).pow(2).mean()

    def ddim_timesteps(self, steps: int) -> list[int]:
        """``steps`` evenly spaced timesteps, descending (LDM's ``uniform`` discretisation)."""
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"DDIM steps must lie in 1..{self.timesteps}, got {steps}")
        stride = self.timesteps // steps
        return list(range(0, stride * steps, stride))[::-1]

    def ddim_step(self, z_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int, eta: float,
                  noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step from ``t`` to ``t_prev`` (-1: to the clean latent); returns z_prev and
        the predicted clean latent. ``noise`` may be None when eta is 0."""
        a_t = float(self.alphas_cumprod[t])
        a_p = float(self.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
        z0 = (z_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        sigma = eta * math.sqrt((1 - a_p) / (1 - a_t)) * math.sqrt(1 - a_t / a_p)
        z_prev = math.sqrt(a_p) * z0 + math.sqrt(max(1 - a_p - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            assert noise is not None, "DDIM with eta > 0 needs noise"
            z_prev = z_prev + sigma * noise
        return z_prev, z0

    def sample(self, eps_fn: EpsFn, shape: tuple[int, ...], steps: int, eta: float,
               gen: torch.Generator, device: torch.device, grad_fn: GradFn | None = None,
               guidance: float = 0.0) -> torch.Tensor:
        """DDIM sampling from pure noise. ``grad_fn(z_t, t)`` returns grad log p(y | z_t) for
        classifier guidance of strength ``guidance``. Noise comes from ``gen`` (on the CPU), so
        a seed gives the same latents on any device."""
        z = randn(shape, gen, torch.empty(0, device=device))
        times = self.ddim_timesteps(steps)
        for i, t in enumerate(times):
            t_prev = times[i + 1] if i + 1 < len(times) else -1
            tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
            eps = eps_fn(z, tt)
            if grad_fn is not None and guidance:
                eps = eps - guidance * math.sqrt(1 - float(self.alphas_cumprod[t])) * grad_fn(z, tt)
            noise = randn(shape, gen, z) if eta > 0 else None
            z, _ = self.ddim_step(z, eps, t, t_prev, eta, noise)
        return z


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (cos, sin halves) of (possibly fractional) timesteps: (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    return F.pad(emb, (0, dim % 2))


def randn(shape: tuple[int, ...] | torch.Size, gen: torch.Generator, like: torch.Tensor
          ) -> torch.Tensor:
    """Standard normal noise drawn from a CPU generator, moved to ``like``'s device."""
    return torch.randn(tuple(shape), generator=gen).to(like.device)


def cfg_eps(net: Callable[..., torch.Tensor], y: torch.Tensor, null: int, scale: float) -> EpsFn:
    """Classifier-free guidance: eps_c + scale (eps_c - eps_u), with the null label ``null`` for
    eps_u (one doubled batch); ``scale`` 0 is plain conditional sampling (one pass)."""

    def eps(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not scale:
            return net(z, t, y)
        both = net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]))
        cond, uncond = both.chunk(2)
        return cond + scale * (cond - uncond)

    return eps


def seed_for(*parts: int) -> int:
    """A 63-bit seed derived from integers (run seed, class, batch...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)
