"""Differentiable augmentation (DSA, Zhao & Bilen 2021) with stain normalisation.

Images are float tensors (B, 3, H, W) in the network's *normalised* space (per-channel
``(x - mean) / std`` with the dataset's statistics, :class:`histodistill.data.real.Stats`), as in the
DSA reference code. So colour strengths mean what they mean there, and every geometric fill
(crop, cutout, scale, rotate) is 0, the dataset mean. ``stain`` maps back to pixels, applies the
differentiable Macenko normaliser and maps forward again.

:meth:`Augment.sample` draws parameters for ``n`` images. Gradient matching draws once
(``n=1``) and applies the same values to every image of the real and the synthetic batch
(siamese, DSA's ``batchmode``). Training a network draws per image (``n=B``), as the reference
does outside matching.

Ops: ``color`` (brightness, saturation, contrast), ``crop`` (translation), ``cutout``,
``flip``, ``scale``, ``rotate`` and ``stain``. ``mode: single`` applies one op drawn per call
(DSA's default ``aug_mode='S'``); ``all`` applies each in turn. Histo-DD's ``all`` preset
(its Table 2) is stain normalisation, rotation, flipping and scaling, all applied every call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from histodistill import config
from histodistill.stain import MacenkoNormaliser, StainTemplate

OPS = ("color", "crop", "cutout", "flip", "scale", "rotate", "stain")
# Histo-DD's augmentation ablation (Table 2) and DSA's strategy, as presets: (ops, mode)
PRESETS: dict[str, tuple[list[str], str]] = {
    "none": ([], "all"),
    "stain": (["stain"], "all"),
    "rotate": (["rotate"], "all"),
    "flip": (["flip"], "all"),
    "scale": (["scale"], "all"),
    "dsa": (["color", "crop", "cutout", "flip", "scale", "rotate"], "single"),
    "all": (["stain", "rotate", "flip", "scale"], "all"),
    # two strong views of one patch for contrastive learning (SimCLR: crop, flip, colour)
    "simclr": (["crop", "scale", "flip", "rotate", "color"], "all"),
}
Params = list[tuple[str, dict[str, torch.Tensor]]]


@dataclass
class AugmentConfig:
    """An ``augment`` section's ops, mode and strengths; the strengths' defaults, DSA's
    ``ParamDiffAug``, are the schema's (``$defs/augment``)."""

    ops: list[str]
    mode: str
    brightness: float
    saturation: float
    contrast: float
    crop: float
    cutout: float
    scale: float
    rotate: float  # degrees
    flip: float

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "AugmentConfig":
        """From a validated ``augment`` section (every strength present): ``preset`` names ops
        and mode unless ``ops`` (and ``mode``) are given."""
        preset = cfg["preset"]
        if preset not in PRESETS:
            raise ValueError(f"unknown augmentation preset {preset!r}; choose from {sorted(PRESETS)}")
        ops, mode = PRESETS[preset]
        ops = cfg.get("ops") or ops  # optional: the preset's unless given
        mode = cfg.get("mode") or mode
        unknown = set(ops) - set(OPS)
        if unknown:
            raise ValueError(f"unknown augmentation op(s) {sorted(unknown)}; choose from {OPS}")
        if mode not in ("single", "all"):
            raise ValueError(f"augmentation mode {mode!r}: choose 'single' or 'all'")
        strengths = [f.name for f in fields(cls) if f.name not in ("ops", "mode")]
        return cls(ops=list(ops), mode=mode, **{k: cfg[k] for k in strengths})


class Augment:
    """Differentiable augmentation in normalised space; ``stain`` needs the stain template and
    the dataset's channel statistics (``mean``, ``std``: 3-element sequences)."""

    def __init__(self, cfg: AugmentConfig, template: StainTemplate | None = None,
                 mean: Any = (0.0, 0.0, 0.0), std: Any = (1.0, 1.0, 1.0)) -> None:
        self.cfg = cfg
        if "stain" in cfg.ops and template is None:
            raise ValueError("augmentation op 'stain' needs the dataset's stain template")
        self.normaliser = MacenkoNormaliser(template) if template is not None else None
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1)

    @classmethod
    def identity(cls) -> "Augment":
        """An augmenter with no ops: the identity, drawing no numbers."""
        return cls(AugmentConfig.from_config({**config.defaults("$defs/augment"), "preset": "none"}))

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.ops)

    def sample(self, gen: torch.Generator, n: int = 1) -> Params:
        """Draw the ops and their parameters for ``n`` images (``n=1``: one draw shared by
        every image it is applied to)."""
        ops = self.cfg.ops
        if not ops:
            return []
        if self.cfg.mode == "single":
            ops = [ops[int(torch.randint(len(ops), (1,), generator=gen))]]
        c = self.cfg
        out = []
        for op in ops:
            u = torch.rand(4, n, generator=gen)
            params = {
                "color": {"brightness": (u[0] - 0.5) * c.brightness, "saturation": u[1] * c.saturation,
                          "contrast": u[2] + c.contrast},
                "crop": {"dx": u[0] * 2 - 1, "dy": u[1] * 2 - 1},
                "cutout": {"cx": u[0], "cy": u[1]},
                "flip": {"flip": (u[0] < c.flip).float()},
                "scale": {"sx": u[0] * (c.scale - 1 / c.scale) + 1 / c.scale,
                          "sy": u[1] * (c.scale - 1 / c.scale) + 1 / c.scale},
                "rotate": {"theta": (u[0] - 0.5) * 2 * c.rotate / 180 * math.pi},
                "stain": {},
            }[op]
            out.append((op, params))
        return out

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """Apply sampled parameters: one draw to every image, or one draw per image."""
        for op, p in params:
            p = {k: v.to(x.device, x.dtype) for k, v in p.items()}
            x = getattr(self, f"_{op}")(x, p)
        return x

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Augment each image of the batch with its own parameters (network training)."""
        return self.apply(x, self.sample(gen, len(x)))

    @staticmethod
    def _b(v: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, 1, 1, 1)

    def _color(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        x = x + self._b(p["brightness"])
        mean = x.mean(1, keepdim=True)
        x = (x - mean) * self._b(p["saturation"]) + mean
        mean = x.mean((1, 2, 3), keepdim=True)
        return (x - mean) * self._b(p["contrast"]) + mean

    def _affine(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Resample through per-image (or shared) 2x3 matrices; outside the image is 0 (the
        dataset mean in normalised space)."""
        grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=True)
        return F.grid_sample(x, grid, align_corners=True)

    def _crop(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        """Translate by whole pixels, up to ``crop`` of the size (DSA's crop with padding)."""
        h, w = x.shape[2:]
        dy = torch.round(p["dy"] * int(h * self.cfg.crop + 0.5))
        dx = torch.round(p["dx"] * int(w * self.cfg.crop + 0.5))
        one, zero = torch.ones_like(dx), torch.zeros_like(dx)
        theta = torch.stack([torch.stack([one, zero, 2 * dx / max(w - 1, 1)], -1),
                             torch.stack([zero, one, 2 * dy / max(h - 1, 1)], -1)], 1)
        return self._affine(x, theta)

    def _cutout(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        h, w = x.shape[2:]
        ch, cw = int(h * self.cfg.cutout + 0.5), int(w * self.cfg.cutout + 0.5)
        y0 = (p["cy"] * (h + 1 - ch % 2)).long() - ch // 2
        x0 = (p["cx"] * (w + 1 - cw % 2)).long() - cw // 2
        ys = torch.arange(h, device=x.device).reshape(1, h, 1)
        xs = torch.arange(w, device=x.device).reshape(1, 1, w)
        y0, x0 = y0.reshape(-1, 1, 1), x0.reshape(-1, 1, 1)
        hole = (ys >= y0) & (ys < y0 + ch) & (xs >= x0) & (xs < x0 + cw)
        return x * (~hole).unsqueeze(1).to(x.dtype)

    def _flip(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        return torch.where(self._b(p["flip"]) > 0, x.flip(3), x)

    def _scale(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        sx, sy = p["sx"], p["sy"]
        zero = torch.zeros_like(sx)
        theta = torch.stack([torch.stack([sx, zero, zero], -1), torch.stack([zero, sy, zero], -1)], 1)
        return self._affine(x, theta)

    def _rotate(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        c, s = torch.cos(p["theta"]), torch.sin(p["theta"])
        zero = torch.zeros_like(c)
        theta = torch.stack([torch.stack([c, s, zero], -1), torch.stack([-s, c, zero], -1)], 1)
        return self._affine(x, theta)

    def _stain(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        assert self.normaliser is not None
        self.normaliser.to(x.device)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        pixels = (x * std + mean).clamp(0, 1)
        return (self.normaliser(pixels) - mean) / std
