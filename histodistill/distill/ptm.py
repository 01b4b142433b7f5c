"""PTM: progressive trajectory matching for medical dataset distillation (no public code; built
from the paper's Sec. 3; docs: "PTM as we read it").

* Progressive matching: every round starts from theta_0, the drawn expert's initial parameters,
  and follows the expert up to end point t, which grows from 1 to T (``end_epoch``) over the run
  (:func:`end_point`: equal shares of the iterations per end point). The student takes
  ``syn_steps`` SGD steps on the synthetic images per expert epoch. Its training loss is L_c,
  the plain cross-entropy of the (augmented) synthetic batch: the paper's "synthetic student
  network trajectories [learnt] using cross-entropy loss L_c", what MTT's inner loop minimises.
  No loss of the images under the expert exists.
* Non-forgetful matching (Eq. 1, our reading: the sum over t runs over the epoch boundaries the
  student passes): with ``match_points: all`` L_match is the mean over s = 1..t of
  ||theta_s^S - theta_s^D||^2 / ||theta_s^D - theta_0^D||^2, so the images keep matching the
  early epochs while the end point moves on; ``end`` matches theta_t alone (MTT's form).
* Dynamic overlap mitigation: each class's images are split evenly into a foundation subset S^f
  (the first half) and a complement S^c (the rest). L_overlap is minus the squared MMD between
  them, Gaussian kernel, same-class pairs only (:func:`overlap_mmd`), averaged over the pairs
  (Eq. 4 sums them; a sum's weight against the mean L_match grows with ipc^2). Only the cross
  term carries gradient, so minimising it pushes the complement away from the foundation
  (diversity) without collapsing each half. The kernel width is the median heuristic by default
  (``sigma: median``: 2 sigma^2 = the median squared distance of the class's images, per step),
  so the kernel neither vanishes nor saturates at real-patch distances.
* Retraining: at the points m_i = T - T/(k+1) * i (i = 1..k, ``retrain``) of the schedule, S^c
  is reset to its snapshot from the middle of the previous interval (:func:`retrain_iterations`);
  S^f is untouched.
* L = beta1 * L_match + beta2 * L_overlap on the images (``beta_match``, ``beta_overlap``).

Images live in normalised space and are clamped after every step, as in MTT, whose student,
learnable learning rate and optimisers PTM shares.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from histodistill.distill.base import register
from histodistill.distill.mtt import MTT, matching_loss


def end_point(it: int, iterations: int, end_epoch: int) -> int:
    """The expert epoch matched at iteration ``it``: 1 for the first share of the run, then 2,
    ..., T for the last (each end point gets ``iterations / T`` iterations)."""
    return min(end_epoch, 1 + it * end_epoch // iterations)


def retrain_points(end_epoch: int, k: int) -> list[float]:
    """m_i = T - T / (k + 1) * i for i = 1..k (descending: the run reaches m_k first)."""
    return [end_epoch - end_epoch / (k + 1) * i for i in range(1, k + 1)]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def retrain_iterations(iterations: int, k: int) -> list[tuple[int, int]]:
    """(snapshot iteration, reset iteration) of each retraining point m_i, i = 1..k.

    The run's position on the [0, T] axis at iteration ``it`` is it * T / iterations. S^c is
    reset at the first iteration at or past m_i, i.e. ceil(iterations * (k + 1 - i) / (k + 1)),
    to the snapshot taken at the first iteration at or past the middle of the interval that ends
    at m_i, (m_{i+1} + m_i) / 2 with m_{k+1} = 0. Integer arithmetic: exact for any T.
    """
    events = []
    for i in range(1, k + 1):
        reset = _ceil_div(iterations * (k + 1 - i), k + 1)
        snapshot = _ceil_div(iterations * (2 * k + 1 - 2 * i), 2 * (k + 1))
        events.append((snapshot, reset))
    return events


def complement_mask(num_classes: int, ipc: int) -> torch.Tensor:
    """True for S^c: the last ipc // 2 images of each class (S^f keeps the first ceil(ipc / 2))."""
    within = torch.arange(ipc) >= ipc - ipc // 2
    return within.repeat(num_classes)


def median_sigma(x: torch.Tensor) -> float:
    """The median heuristic's kernel width for images ``x`` (n, D): sigma with 2 sigma^2 the
    median over distinct pairs of the mean squared difference per value (1.0 for fewer than two
    images or identical ones)."""
    if len(x) < 2:
        return 1.0
    sq = torch.pdist(x.detach().flatten(1)).pow(2) / x[0].numel()
    med = float(sq.median())
    return math.sqrt(med / 2) if med > 0 else 1.0


def overlap_mmd(images: torch.Tensor, labels: torch.Tensor, complement: torch.Tensor,
                sigma: float | str, within_grad: bool = True) -> torch.Tensor:
    """Squared MMD between S^f and S^c with the kernel k(a, b) = exp(-d(a, b) / (2 sigma^2)) *
    1[same class], d the mean squared difference per value (||a - b||^2 / D), summed over
    classes.

    Per class, mean k(f, f') + mean k(c, c') - 2 mean k(f, c): the paper's double sum of Eq. 4
    (with the sign that makes L_overlap = -MMD^2) divided by its number of pairs, so its value
    for the same images does not grow with ipc. Zero when the subsets are identical, positive
    otherwise. ``sigma`` is a width in normalised pixel units or "median" (:func:`median_sigma`
    of the class's images, recomputed on every call, never differentiated).

    ``within_grad=False`` treats the within-subset terms as constants (same value): maximising
    them would pull each subset's images together, so PTM maximises the MMD through the cross
    term alone, which only pushes S^c away from S^f.
    """
    x = images.flatten(1)
    d = x.shape[1]

    def kernel(a: torch.Tensor, b: torch.Tensor, width: float) -> torch.Tensor:
        sq = (a[:, None] - b[None]).pow(2).sum(-1)  # exact, smooth at zero distance
        return torch.exp(-sq / (d * 2 * width ** 2)).mean()

    total = images.new_zeros(())
    for c in labels.unique():
        members = labels == c
        f_set = x[members & ~complement]
        c_set = x[members & complement]
        if len(f_set) == 0 or len(c_set) == 0:
            continue
        width = median_sigma(x[members]) if sigma == "median" else float(sigma)
        within = kernel(f_set, f_set, width) + kernel(c_set, c_set, width)
        if not within_grad:
            within = within.detach()
        total = total + within - 2 * kernel(f_set, c_set, width)
    return total


@register("ptm")
class PTM(MTT):
    def init_state(self) -> None:
        super().init_state()
        self.complement = complement_mask(self.ctx.num_classes, self.ipc).to(self.ctx.device)
        self.events = retrain_iterations(self.iterations, int(self.cfg["retrain"]))
        self.snapshots: dict[int, torch.Tensor] = {}

    def check_epochs(self) -> None:
        if self.cfg["match_points"] not in ("all", "end"):
            raise ValueError(f"distill.methods.ptm.match_points {self.cfg['match_points']!r} must "
                             "be 'all' (every epoch boundary up to t) or 'end'")
        end = int(self.cfg["end_epoch"])
        if not 1 <= end <= self.experts.epochs:
            raise ValueError(f"distill.methods.ptm.end_epoch {end} must lie in 1.."
                             f"{self.experts.epochs}, the epochs in {self.experts.path} "
                             "(trajectories.epochs)")

    def retrain(self, it: int) -> None:
        """Snapshot S^c in the middle of each interval; reset S^c to it at each m_i (and restart
        its momentum). S^f is never touched."""
        rows = self.complement
        for i, (snapshot, reset) in enumerate(self.events, 1):
            if it == snapshot:
                self.snapshots[i] = self.images.detach()[rows].clone()
            if it == reset and i in self.snapshots:
                with torch.no_grad():
                    self.images[rows] = self.snapshots.pop(i)
                    momentum = self.opt.state.get(self.images, {}).get("momentum_buffer")
                    if momentum is not None:
                        momentum[rows] = 0

    def start_epoch(self, t: int) -> int:
        """The expert epoch the student starts from when matching end point t: theta_0 in every
        round (PTM's progressive matching), or with ``start_window`` k > 0 the epoch t - k
        (MTT's span with PTM's schedule: not PTM, the ablation of its from-theta_0 matching)."""
        window = int(self.cfg["start_window"])
        return max(0, t - window) if window else 0

    def match(self, expert: int, s: int, t: int) -> torch.Tensor:
        """L_match of one round: the student unrolled from the expert's epoch s to t,
        ``syn_steps`` steps per epoch, compared at every epoch boundary s+1..t (the mean of the
        normalised distances) or at t alone (``match_points: end``)."""
        steps = int(self.cfg["syn_steps"])
        start = self.expert_point(expert, s)
        if self.cfg["match_points"] == "end":
            return matching_loss(self.student_end(start, (t - s) * steps), start,
                                 self.expert_point(expert, t))
        theta, losses = start, []
        for epoch in range(s + 1, t + 1):
            theta = self.student_end(theta, steps)
            losses.append(matching_loss(theta, start, self.expert_point(expert, epoch)))
        return torch.stack(losses).mean()

    def step(self, it: int) -> float:
        c = self.cfg
        self.retrain(it)
        t = end_point(it, self.iterations, int(c["end_epoch"]))
        expert = self.draw(self.experts.experts)
        l_match = self.match(expert, self.start_epoch(t), t)
        l_overlap = -overlap_mmd(self.images, self.y_syn, self.complement, c["sigma"],
                                 within_grad=False)
        loss = float(c["beta_match"]) * l_match + float(c["beta_overlap"]) * l_overlap
        self.update(loss)
        return loss.item()

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(),
                "snapshots": {i: s.cpu() for i, s in self.snapshots.items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.snapshots = {int(i): s.to(self.ctx.device) for i, s in state["snapshots"].items()}
