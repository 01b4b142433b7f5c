"""Differentiable siamese augmentation (DSA, Zhao & Bilen 2021) with stain normalisation.

:meth:`Augment.sample` draws one set of parameters; :meth:`Augment.apply` applies it to a batch.
Gradient matching samples once and applies the same parameters to the real and the synthetic
batch (siamese), as DSA does: one parameter value is shared by every image of both batches.
Images are float tensors (B, 3, H, W) in [0, 1]; every op is differentiable in the pixels.

Ops: ``color`` (brightness, saturation, contrast), ``crop`` (translation), ``cutout``,
``flip``, ``scale``, ``rotate`` and ``stain`` (Macenko normalisation to the dataset's template).
``mode: single`` applies one op drawn at random per call (DSA's default); ``all`` applies each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from histodistill.stain import MacenkoNormaliser, StainTemplate

OPS = ("color", "crop", "cutout", "flip", "scale", "rotate", "stain")
# Histo-DD's augmentation ablation, as config presets
PRESETS = {
    "none": [],
    "stain": ["stain"],
    "rotate": ["rotate"],
    "flip": ["flip"],
    "scale": ["scale"],
    "dsa": ["color", "crop", "cutout", "flip", "scale", "rotate"],
    "all": ["color", "crop", "cutout", "flip", "scale", "rotate", "stain"],
}


@dataclass
class AugmentConfig:
    """Strengths follow DSA's defaults."""

    ops: list[str] = field(default_factory=lambda: list(PRESETS["all"]))
    mode: str = "single"
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    crop: float = 0.125
    cutout: float = 0.5
    scale: float = 1.2
    rotate: float = 15.0  # degrees
    flip: float = 0.5

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "AugmentConfig":
        """From the ``augment`` config section: ``preset`` names an op list unless ``ops`` is set."""
        cfg = dict(cfg)
        preset = cfg.pop("preset", "all")
        ops = cfg.pop("ops", None) or PRESETS[preset]
        unknown = set(ops) - set(OPS)
        if unknown:
            raise ValueError(f"unknown augmentation op(s) {sorted(unknown)}; choose from {OPS}")
        return cls(ops=list(ops), **cfg)


class Augment:
    """Siamese differentiable augmentation; ``stain`` needs the dataset's stain template."""

    def __init__(self, cfg: AugmentConfig, template: StainTemplate | None = None) -> None:
        self.cfg = cfg
        if "stain" in cfg.ops and template is None:
            raise ValueError("augmentation op 'stain' needs the dataset's stain template")
        self.normaliser = MacenkoNormaliser(template) if template is not None else None

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.ops)

    def sample(self, gen: torch.Generator) -> list[tuple[str, dict[str, float]]]:
        """Draw the ops and their parameters for one siamese call."""
        ops = self.cfg.ops
        if not ops:
            return []
        if self.cfg.mode == "single":
            ops = [ops[int(torch.randint(len(ops), (1,), generator=gen))]]
        c = self.cfg
        out = []
        for op in ops:
            u = torch.rand(4, generator=gen).tolist()
            params = {
                "color": {"brightness": (u[0] - 0.5) * c.brightness, "saturation": u[1] * c.saturation,
                          "contrast": u[2] + c.contrast},
                "crop": {"dx": u[0] * 2 - 1, "dy": u[1] * 2 - 1},
                "cutout": {"cx": u[0], "cy": u[1]},
                "flip": {"flip": float(u[0] < c.flip)},
                "scale": {"sx": u[0] * (c.scale - 1 / c.scale) + 1 / c.scale,
                          "sy": u[1] * (c.scale - 1 / c.scale) + 1 / c.scale},
                "rotate": {"theta": (u[0] - 0.5) * 2 * c.rotate / 180 * math.pi},
                "stain": {},
            }[op]
            out.append((op, params))
        return out

    def apply(self, x: torch.Tensor, params: list[tuple[str, dict[str, float]]]) -> torch.Tensor:
        """Apply sampled parameters to a batch (the same values to every image)."""
        for op, p in params:
            x = getattr(self, f"_{op}")(x, p)
        return x

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.sample(gen))

    def _color(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        x = x + p["brightness"]
        mean = x.mean(1, keepdim=True)
        x = (x - mean) * p["saturation"] + mean
        mean = x.mean((1, 2, 3), keepdim=True)
        return (x - mean) * p["contrast"] + mean

    def _crop(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        h, w = x.shape[2:]
        ph, pw = int(h * self.cfg.crop + 0.5), int(w * self.cfg.crop + 0.5)
        dy, dx = int(round(p["dy"] * ph)), int(round(p["dx"] * pw))
        padded = F.pad(x, (pw, pw, ph, ph))
        return padded[:, :, ph + dy:ph + dy + h, pw + dx:pw + dx + w]

    def _cutout(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        h, w = x.shape[2:]
        ch, cw = int(h * self.cfg.cutout + 0.5), int(w * self.cfg.cutout + 0.5)
        y0 = int(p["cy"] * (h + 1 - ch % 2)) - ch // 2
        x0 = int(p["cx"] * (w + 1 - cw % 2)) - cw // 2
        mask = torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device)
        mask[..., max(y0, 0):max(y0 + ch, 0), max(x0, 0):max(x0 + cw, 0)] = 0
        return x * mask

    def _flip(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        return x.flip(3) if p["flip"] else x

    def _affine(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=True)
        return F.grid_sample(x, grid, align_corners=True)

    def _scale(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        theta = torch.tensor([[[p["sx"], 0.0, 0.0], [0.0, p["sy"], 0.0]]], dtype=x.dtype, device=x.device)
        return self._affine(x, theta)

    def _rotate(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        c, s = math.cos(p["theta"]), math.sin(p["theta"])
        theta = torch.tensor([[[c, s, 0.0], [-s, c, 0.0]]], dtype=x.dtype, device=x.device)
        return self._affine(x, theta)

    def _stain(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        assert self.normaliser is not None
        self.normaliser.to(x.device)
        return self.normaliser(x.clamp(0, 1))
