"""PTM: progressive trajectory matching for medical dataset distillation (no public code; built
from the paper's description as the project's issue 8 states it; README: "Trajectory matching").

* Progressive matching: every round starts from theta_0, the drawn expert's initial parameters,
  and matches the expert at end point t, which grows from 1 to T (``end_epoch``) over the run
  (:func:`end_point`: equal shares of the iterations per end point). The student takes
  ``syn_steps`` SGD steps per expert epoch, t * ``syn_steps`` in all.
  L_match = ||theta_t^S - theta_t^D||^2 / ||theta_t^D - theta_0^D||^2.
* Dynamic overlap mitigation: each class's images are split evenly into a foundation subset S^f
  (the first half) and a complement S^c (the rest). L_overlap is minus the squared MMD between
  them, Gaussian kernel, same-class pairs only (:func:`overlap_mmd`): minimising it pushes the
  complement away from the foundation (diversity). Its within-subset terms are constants for
  the gradient: maximising them collapses each half into one image.
* Retraining: at the points m_i = T - T/(k+1) * i (i = 1..k, ``retrain``) of the schedule, S^c
  is reset to its snapshot from the middle of the previous interval (:func:`retrain_iterations`);
  S^f is untouched.
* L = beta_c * L_c + beta1 * L_match + beta2 * L_overlap, with L_c the cross-entropy of the
  (augmented) synthetic images under the expert at the end point theta_t^D (beta_c 1: the issue's
  L = L_c + ...).

Images live in normalised space and are clamped after every step, as in MTT, whose student,
learnable learning rate and optimisers PTM shares.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

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


def overlap_mmd(images: torch.Tensor, labels: torch.Tensor, complement: torch.Tensor,
                sigma: float, within_grad: bool = True) -> torch.Tensor:
    """Squared MMD between S^f and S^c with the kernel k(a, b) = exp(-d(a, b) / (2 sigma^2)) *
    1[same class], d the mean squared difference per value (||a - b||^2 / D).

    Per class, (n_f n_c) * (mean k(f, f') + mean k(c, c') - 2 mean k(f, c)): for halves of
    equal size n this is sum_i sum_j (k(f_i, f_j) + k(c_i, c_j) - 2 k(f_i, c_j)), the paper's
    sum with the opposite sign. Zero when the subsets are identical, positive otherwise.

    ``within_grad=False`` treats the within-subset terms as constants (same value): maximising
    them would pull each subset's images together, so PTM maximises the MMD through the cross
    term alone, which only pushes S^c away from S^f (README: "PTM as we read it").
    """
    x = images.flatten(1)
    d = x.shape[1]

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        sq = (a[:, None] - b[None]).pow(2).sum(-1)  # exact, smooth at zero distance
        return torch.exp(-sq / (d * 2 * sigma ** 2)).mean()

    total = images.new_zeros(())
    for c in labels.unique():
        f_set = x[(labels == c) & ~complement]
        c_set = x[(labels == c) & complement]
        if len(f_set) == 0 or len(c_set) == 0:
            continue
        within = kernel(f_set, f_set) + kernel(c_set, c_set)
        if not within_grad:
            within = within.detach()
        total = total + len(f_set) * len(c_set) * (within - 2 * kernel(f_set, c_set))
    return total


@register("ptm")
class PTM(MTT):
    def init_state(self) -> None:
        super().init_state()
        self.complement = complement_mask(self.ctx.num_classes, self.ipc).to(self.ctx.device)
        self.events = retrain_iterations(self.iterations, int(self.cfg["retrain"]))
        self.snapshots: dict[int, torch.Tensor] = {}

    def check_epochs(self) -> None:
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
        round (PTM's progressive matching; bench/ptm_ablation.py varies it)."""
        return 0

    def step(self, it: int) -> float:
        c = self.cfg
        self.retrain(it)
        t = end_point(it, self.iterations, int(c["end_epoch"]))
        s = self.start_epoch(t)
        expert = self.draw(self.experts.experts)
        start = self.expert_point(expert, s)
        target = self.expert_point(expert, t)
        l_match = matching_loss(self.student_end(start, (t - s) * int(c["syn_steps"])), start,
                                target)
        x = self.aug(self.images, self.gen)
        l_c = F.cross_entropy(self.student(target, x), self.y_syn)
        l_overlap = -overlap_mmd(self.images, self.y_syn, self.complement, float(c["sigma"]),
                                 within_grad=False)
        loss = (float(c["beta_c"]) * l_c + float(c["beta_match"]) * l_match
                + float(c["beta_overlap"]) * l_overlap)
        self.update(loss)
        return loss.item()

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(),
                "snapshots": {i: s.cpu() for i, s in self.snapshots.items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.snapshots = {int(i): s.to(self.ctx.device) for i, s in state["snapshots"].items()}
