"""Gradient matching shared by DC, DSA and Histo-DD, and Histo-DD's model augmentation."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def l1_distance(g_real: torch.Tensor, g_syn: torch.Tensor) -> torch.Tensor:
    """Histo-DD's layer distance: the L1 norm of the gradient difference."""
    return (g_real - g_syn).abs().sum()


def cosine_distance(g_real: torch.Tensor, g_syn: torch.Tensor) -> torch.Tensor:
    """DC's layer distance: sum over output channels of 1 - cos(g_real, g_syn)."""
    if g_real.dim() == 1:
        return g_real.new_zeros(())  # DC ignores biases
    gr = g_real.reshape(g_real.shape[0], -1)
    gs = g_syn.reshape(g_syn.shape[0], -1)
    nr, ns = gr.norm(dim=1), gs.norm(dim=1)
    live_r, live_s = nr > 1e-8, ns > 1e-8
    cos = (gr * gs).sum(1) / (nr * ns).clamp_min(1e-12)
    # a channel silent in both batches (dead filter) carries no signal: distance 0, so identical
    # batches are at distance 0; silent in one batch only: 1, as DC's epsilon gives
    dist = torch.where(live_r & live_s, 1 - cos, (live_r | live_s).to(cos.dtype))
    return dist.sum()


DISTANCES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "l1": l1_distance, "cos": cosine_distance}


def matched_params(net: nn.Module, distance: str, include_fc: bool) -> list[nn.Parameter]:
    """Parameters whose gradients are matched. L1 (Histo-DD, after IDC) skips biases and norm
    parameters (1-D) and, unless ``include_fc``, the linear head; cosine (DC) uses them all."""
    params = []
    for name, p in net.named_parameters():
        if distance == "l1" and (p.dim() == 1 or (p.dim() == 2 and not include_fc)):
            continue
        params.append(p)
    return params


def cross_entropy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(net(x), y)


def match_loss(net: nn.Module, params: list[nn.Parameter], x_real: torch.Tensor,
               y_real: torch.Tensor, x_syn: torch.Tensor, y_syn: torch.Tensor,
               distance: str, syn_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor],
                                                 torch.Tensor] = cross_entropy) -> torch.Tensor:
    """Distance between the cross-entropy gradient of a real batch and the ``syn_loss``
    gradient (cross-entropy unless a method says otherwise) of a synthetic batch.

    Real gradients are constants; synthetic ones keep their graph (second order), so the
    result is differentiable in ``x_syn`` and in anything ``syn_loss`` depends on.
    """
    dist = DISTANCES[distance]
    g_real = torch.autograd.grad(cross_entropy(net, x_real, y_real), params)
    g_syn = torch.autograd.grad(syn_loss(net, x_syn, y_syn), params, create_graph=True)
    loss = sum(dist(gr.detach(), gs) for gr, gs in zip(g_real, g_syn))
    assert isinstance(loss, torch.Tensor), "no parameters to match"  # sum() of none is 0
    return loss


def _filter_direction(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A Gaussian direction with each output filter rescaled to that filter's norm."""
    d = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
    d_norm = d.reshape(len(d), -1).norm(dim=1).clamp_min(1e-10)
    w_norm = p.reshape(len(p), -1).norm(dim=1)
    return d * (w_norm / d_norm).reshape((-1,) + (1,) * (p.dim() - 1))


@torch.no_grad()
def model_augment(net: nn.Module, alpha: float | list[float], gen: torch.Generator, *,
                  directions: int) -> list[float]:
    """Perturb weights in place along filter-normalised random directions (Acc-DD).

    ``directions`` Gaussian directions d_k, each filter rescaled to the norm of the weight
    filter it perturbs; w += sum_k a_k d_k. ``alpha`` is a fixed step or a range [lo, hi] from
    which each |a_k| is drawn uniformly with a random sign (Acc-DD: [0.01, 0.09], two
    directions). Biases and normalisation parameters (1-D) are left alone. Returns the steps.
    """
    steps = []
    for _ in range(directions):
        if isinstance(alpha, (list, tuple)):
            lo, hi = float(alpha[0]), float(alpha[1])
            u = torch.rand(2, generator=gen).tolist()
            steps.append((lo + (hi - lo) * u[0]) * (1.0 if u[1] < 0.5 else -1.0))
        else:
            steps.append(float(alpha))
    for p in net.parameters():
        if p.dim() < 2:
            continue
        delta = sum(a * _filter_direction(p, gen) for a in steps)  # all relative to the same w
        p.add_(delta)
    return steps
