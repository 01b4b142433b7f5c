"""U-ViT (Bao et al. 2023, baofff/U-ViT): a transformer noise predictor over latent patches.

Everything is a token: the timestep (sinusoidal embedding), the class label (a learned
embedding; index ``num_classes`` is the null label of classifier-free guidance; no label token
when unconditional) and the latent's patches (a strided convolution). Blocks are pre-norm
transformer blocks; the first half's outputs are carried by long skip connections to the second
half, where each is concatenated with the running tokens and projected back (``skip_linear``).
A linear head maps patch tokens back to pixels of the latent, followed by a 3x3 convolution.

Presets follow the paper's table (depth counts the in, mid and out blocks, 2k + 1):
``small`` U-ViT-S (13 blocks, width 512, 8 heads), ``mid`` U-ViT-M (17, 768, 12), ``large``
U-ViT-L (21, 1024, 16); ``tiny`` is ours, for the CPU demo and tests.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from histodistill.generate.diffusion import timestep_embedding

PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"dim": 64, "depth": 6, "heads": 4},
    "small": {"dim": 512, "depth": 12, "heads": 8},
    "mid": {"dim": 768, "depth": 16, "heads": 12},
    "large": {"dim": 1024, "depth": 20, "heads": 16},
}


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"U-ViT width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block; with ``skip``, a long skip enters through a linear layer."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, skip: bool) -> None:
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            assert skip is not None, "a block with a skip layer takes a skip"
            x = self.skip_linear(torch.cat([x, skip], -1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    """Noise predictor eps(z_t, t, y) on (B, C, S, S) latents; ``num_classes`` 0 is
    unconditional, otherwise labels run 0..num_classes with ``num_classes`` the null label."""

    def __init__(self, in_channels: int, latent_size: int, *, patch_size: int, dim: int,
                 depth: int, heads: int, mlp_ratio: float, grad_checkpoint: bool,
                 num_classes: int = 0, conv_out: bool = True) -> None:
        super().__init__()
        if depth % 2:
            raise ValueError(f"U-ViT depth must be even (in and out halves), got {depth}")
        if latent_size % patch_size:
            raise ValueError(f"latent size {latent_size} is not divisible by the U-ViT patch size "
                             f"{patch_size} (generate.generator.patch_size)")
        self.in_channels, self.patch_size, self.dim = in_channels, patch_size, dim
        self.num_classes, self.grad_checkpoint = num_classes, grad_checkpoint
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.label_emb = nn.Embedding(num_classes + 1, dim) if num_classes else None
        self.extras = 2 if num_classes else 1
        tokens = (latent_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + tokens, dim))
        self.in_blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, False) for _ in range(depth // 2))
        self.mid_block = Block(dim, heads, mlp_ratio, False)
        self.out_blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, True) for _ in range(depth // 2))
        self.norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, patch_size ** 2 * in_channels)
        self.final_layer = nn.Conv2d(in_channels, in_channels, 3, padding=1) if conv_out else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def _run(self, block: nn.Module, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.grad_checkpoint and self.training:
            return checkpoint(block, x, skip, use_reentrant=False)
        return block(x, skip)

    def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None
                ) -> torch.Tensor:
        b, c, h, w = z.shape
        x = self.patch_embed(z).flatten(2).transpose(1, 2)
        extras = [timestep_embedding(t, self.dim)[:, None]]
        if self.label_emb is not None:
            if y is None:
                y = torch.full((b,), self.null_label, device=z.device, dtype=torch.long)
            extras.insert(0, self.label_emb(y)[:, None])
        elif y is not None:
            raise ValueError("an unconditional U-ViT takes no class labels")
        x = torch.cat([*extras, x], 1) + self.pos_embed
        skips = []
        for block in self.in_blocks:
            x = self._run(block, x)
            skips.append(x)
        x = self._run(self.mid_block, x)
        for block in self.out_blocks:
            x = self._run(block, x, skips.pop())
        x = self.decoder_pred(self.norm(x))[:, self.extras:]
        p, g = self.patch_size, h // self.patch_size
        x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        return self.final_layer(x)


def build(cfg: dict[str, Any], in_channels: int, latent_size: int, num_classes: int) -> UViT:
    """A U-ViT from generator settings: ``preset`` (tiny/small/mid/large) with optional
    ``dim``/``depth``/``heads`` overrides, ``patch_size``, ``mlp_ratio``, ``grad_checkpoint``."""
    preset = cfg["preset"]
    if preset not in PRESETS:
        raise ValueError(f"unknown U-ViT preset {preset!r}; choose one of {sorted(PRESETS)}")
    arch = {**PRESETS[preset], **{k: cfg[k] for k in ("dim", "depth", "heads") if cfg.get(k)}}
    return UViT(in_channels, latent_size, patch_size=int(cfg["patch_size"]), dim=arch["dim"],
                depth=arch["depth"], heads=arch["heads"], mlp_ratio=float(cfg["mlp_ratio"]),
                grad_checkpoint=bool(cfg["grad_checkpoint"]), num_classes=num_classes)
