"""InfoDist's boundary loss (Li & Kainz, MICCAI 2024, Sec. 2.3), added to the cross-entropy of
a network trained on an InfoDist set (``evaluate.boundary``). Torch only, apart from the
selection (:mod:`.infodist`), so the evaluator imports it without the selection's code."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def boundary_loss(logits: torch.Tensor, y: torch.Tensor, rho: float, tau: float) -> torch.Tensor:
    """InfoDist's boundary loss, summed over classes.

    For class c with probabilities p = softmax(logits)[:, c]: the positive boundary b_p is the
    last of the top ceil(B*rho) positives sorted descending (B positives), b_n = b_p - tau;
    L_c = sum_pos |min(p_i - b_p, 0)| + sum_neg |max(p_j - b_n + tau, 0)|.
    """
    prob = logits.softmax(1)
    total = logits.new_zeros(())
    for c in range(logits.shape[1]):
        pos, neg = prob[y == c, c], prob[y != c, c]
        if len(pos) == 0:
            continue
        ranked = pos.sort(descending=True).values
        top = max(int(np.ceil(len(pos) * rho)), 1)
        b_p = ranked[min(top, len(pos)) - 1].detach()
        b_n = b_p - tau
        total = total + (pos - b_p).clamp(max=0).abs().sum() + (neg - b_n + tau).clamp(min=0).abs().sum()
    return total


def boundary_term(settings: dict[str, float]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The term added to the training loss: ``weight`` times :func:`boundary_loss` at ``rho``
    and ``tau``."""
    weight, rho, tau = float(settings["weight"]), float(settings["rho"]), float(settings["tau"])
    return lambda logits, y: weight * boundary_loss(logits, y, rho, tau)
