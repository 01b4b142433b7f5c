"""TransMIL (Shao et al. 2021, szc19990412/TransMIL): a transformer over the bag with a class
token, Nystrom self-attention and the PPEG positional encoding.

Features pass Linear(in_dim, 512) and ReLU. The sequence is padded to a square, H = W =
ceil(sqrt(N)), by repeating its first patches, and a learnt class token is put in front. Two
pre-norm Nystrom attention layers (8 heads of 64, 256 landmarks, 6 Moore-Penrose iterations, a
depth-wise residual convolution of the values with kernel 33, dropout 0.1; Xiong et al. 2021 as
lucidrains/nystrom-attention implements it) surround the PPEG: the patch tokens reshaped to an
H x W map, plus depth-wise convolutions of kernel 7, 5 and 3 of it. The class token after a
layer norm gives the logits. Training: cross-entropy, Lookahead (k 6, alpha 0.5) over RAdam,
lr 2e-4, weight decay 1e-5, gradients accumulated over 2 bags (the reference's Camelyon16
config).

TransMIL has no single attention over the patches (self-attention among all tokens, padding
included), so its :class:`BagOutput` carries none.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from histodistill.mil.base import BagOutput, MILModel, register


def pinv_iterative(x: torch.Tensor, iters: int) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of the (..., m, m) matrices ``x`` by the iteration of
    Razavi et al. (2014) that Nystromformer uses, from z0 = x^T / (max column sum * max row sum)."""
    abs_x = x.abs()
    z = x.transpose(-1, -2) / (abs_x.sum(-1).max() * abs_x.sum(-2).max())
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Multi-head self-attention approximated with ``landmarks`` segment-mean landmarks."""

    def __init__(self, dim: int, *, heads: int, dim_head: int = 64, landmarks: int,
                 pinv_iterations: int = 6, residual_kernel: int = 33, dropout: float) -> None:
        super().__init__()
        self.heads, self.dim_head, self.landmarks = heads, dim_head, landmarks
        self.pinv_iterations = pinv_iterations
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(heads, heads, (residual_kernel, 1),
                                  padding=(residual_kernel // 2, 0), groups=heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        m = self.landmarks
        pad = (m - n % m) % m  # pad in front so the sequence splits into m equal segments
        x = F.pad(x, (0, 0, pad, 0))
        q, k, v = (t.reshape(b, -1, self.heads, self.dim_head).transpose(1, 2)
                   for t in self.to_qkv(x).chunk(3, dim=-1))
        q = q * self.dim_head ** -0.5
        seg = x.shape[1] // m
        q_land = q.reshape(b, self.heads, m, seg, self.dim_head).mean(3)
        k_land = k.reshape(b, self.heads, m, seg, self.dim_head).mean(3)
        attn1 = (q @ k_land.transpose(-1, -2)).softmax(-1)
        attn2 = (q_land @ k_land.transpose(-1, -2)).softmax(-1)
        attn3 = (q_land @ k.transpose(-1, -2)).softmax(-1)
        out = (attn1 @ pinv_iterative(attn2, self.pinv_iterations)) @ (attn3 @ v)
        out = out + self.res_conv(v)
        out = out.transpose(1, 2).reshape(b, -1, self.heads * self.dim_head)
        return self.to_out(out)[:, -n:]


class TransLayer(nn.Module):
    def __init__(self, dim: int, dropout: float, landmarks: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads=8, dim_head=dim // 8, landmarks=landmarks,
                                     dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm(x))


class PPEG(nn.Module):
    """Pyramid position encoding: the patch tokens as an H x W map plus depth-wise convolutions
    of kernel 7, 5 and 3 of it; the class token passes unchanged."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        b, n, c = x.shape
        if n != 1 + height * width:
            raise ValueError(f"PPEG: {n - 1} patch tokens do not fill a {height}x{width} map")
        cls, feat = x[:, :1], x[:, 1:].transpose(1, 2).reshape(b, c, height, width)
        feat = feat + sum(conv(feat) for conv in self.convs)
        return torch.cat([cls, feat.flatten(2).transpose(1, 2)], dim=1)


def square_pad(h: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A (B, N, C) sequence padded to side**2 tokens by repeating its first ones; and side."""
    side = math.ceil(math.sqrt(h.shape[1]))
    extra = side * side - h.shape[1]
    reps = h[:, torch.arange(extra, device=h.device) % h.shape[1]]
    return torch.cat([h, reps], dim=1), side


@register("transmil")
class TransMIL(MILModel):
    def __init__(self, in_dim: int, num_classes: int, cfg: dict[str, Any]) -> None:
        super().__init__(in_dim, num_classes, cfg)
        dim = int(cfg["dim"])
        dropout = float(cfg["dropout"])
        landmarks = int(cfg["landmarks"])
        self.fc1 = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer1 = TransLayer(dim, dropout, landmarks)
        self.pos = PPEG(dim)
        self.layer2 = TransLayer(dim, dropout, landmarks)
        self.norm = nn.LayerNorm(dim)
        self.fc2 = nn.Linear(dim, num_classes)

    def forward(self, h: torch.Tensor) -> BagOutput:
        x, side = square_pad(self.fc1(h)[None])
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        x = self.pos(self.layer1(x), side, side)
        x = self.norm(self.layer2(x))[:, 0]
        return BagOutput(self.fc2(x)[0], None)

    def optimizer(self) -> torch.optim.Optimizer | Lookahead:
        base = torch.optim.RAdam(self.parameters(), lr=float(self.cfg["lr"]),
                                 weight_decay=float(self.cfg["weight_decay"]))
        look = self.cfg["lookahead"]
        return Lookahead(base, k=int(look["k"]), alpha=float(look["alpha"])) if look else base


class Lookahead:
    """Lookahead (Zhang et al. 2019) around another optimiser: every ``k`` steps the slow
    weights (starting at the initial weights) move ``alpha`` of the way to the fast ones and the
    fast weights restart there. Has the optimiser methods the training loop calls."""

    def __init__(self, base: torch.optim.Optimizer, *, k: int, alpha: float) -> None:
        if k < 1 or not 0 <= alpha <= 1:
            raise ValueError(f"Lookahead needs k >= 1 and 0 <= alpha <= 1, got {k}, {alpha}")
        self.base, self.k, self.alpha, self.steps = base, k, alpha, 0
        self.param_groups = base.param_groups
        self.slow = [p.detach().clone() for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = self.base.step(closure)
        self.steps += 1
        if self.steps % self.k == 0:
            fast = [p for g in self.param_groups for p in g["params"]]
            for p, slow in zip(fast, self.slow):
                slow.add_(p - slow, alpha=self.alpha)
                p.copy_(slow)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base.state_dict(), "steps": self.steps, "slow": self.slow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state["base"])
        self.steps = state["steps"]
        for mine, saved in zip(self.slow, state["slow"]):
            mine.copy_(saved)
