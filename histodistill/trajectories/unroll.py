"""The student of trajectory matching: a network evaluated at a flat parameter vector, trained by
N differentiable SGD steps on synthetic images, with memory that grows sublinearly in N.

MTT's reference keeps the graph of all N steps (each holding the double-backward graph of one
cross-entropy gradient), so memory grows linearly with N. :func:`unroll` computes the same end
point and the same gradients (with respect to the start, the images and the learnable learning
rate) with checkpointed unrolling: the forward pass keeps only the parameter vectors at segment
boundaries (every ``segment`` steps) and no graph; the backward pass recomputes one segment at a
time, from its boundary, with its graph, and back-propagates through it alone. With segments of
about sqrt(N) steps, memory is O(sqrt(N)) boundaries plus O(sqrt(N)) steps of graph, at the
cost of one extra forward pass. Every random choice of a step (its batch and its augmentation)
is drawn once, before the forward pass, into a :class:`Plan`, so a recomputed segment is the
step sequence the forward pass took.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from histodistill.augment import Augment, Params


class Student:
    """``net`` evaluated functionally at a flat parameter vector (the layout of
    ``nn.utils.parameters_to_vector``: ``net.parameters()`` order, each flattened)."""

    def __init__(self, net: nn.Module) -> None:
        buffers = [name for name, _ in net.named_buffers()]
        if buffers:
            raise ValueError(f"trajectory matching needs a network without buffers (running "
                             f"statistics are not part of a trajectory); {type(net).__name__} has "
                             f"{buffers[:3]}: use instance norm or no norm")
        self.net = net
        self.names = [n for n, _ in net.named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in net.named_parameters()]
        self.numels = [p.numel() for _, p in net.named_parameters()]
        self.num_params = sum(self.numels)

    def flat(self) -> torch.Tensor:
        """The network's current parameters as one vector, in any memory format (an expert
        trained in channels_last: :class:`histodistill.runtime.Compute`)."""
        return torch.cat([p.detach().reshape(-1) for p in self.net.parameters()])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Name -> view of ``flat`` with that parameter's shape."""
        return {name: piece.view(shape) for name, piece, shape
                in zip(self.names, torch.split(flat, self.numels), self.shapes)}

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` under the parameters ``flat`` (differentiable in both)."""
        return functional_call(self.net, self.unflatten(flat), (x,))


@dataclass
class Plan:
    """The random choices of an unroll: per step, the indices of the synthetic images it trains
    on and their augmentation parameters (drawn per image, as the reference's DiffAugment)."""

    batches: list[torch.Tensor]
    augments: list[Params]

    @classmethod
    def draw(cls, n_images: int, steps: int, batch: int | None, augment: Augment | None,
             gen: torch.Generator) -> "Plan":
        """MTT's order: a fresh permutation of the images, cut into batches of ``batch`` (all
        images when None), consumed one batch per step (from the end, as the reference pops)."""
        batch = batch or n_images
        batches, augments = [], []
        chunks: list[torch.Tensor] = []
        for _ in range(steps):
            if not chunks:
                chunks = list(torch.randperm(n_images, generator=gen).split(batch))
            idx = chunks.pop()
            batches.append(idx)
            augments.append(augment.sample(gen, len(idx)) if augment is not None and augment.enabled
                            else [])
        return cls(batches, augments)

    def __len__(self) -> int:
        return len(self.batches)


def default_segment(steps: int) -> int:
    """Segment length of the checkpointed unroll: ceil(sqrt(N)), which makes both the kept
    boundaries and the recomputed graph O(sqrt(N))."""
    return max(1, math.ceil(math.sqrt(steps)))


def _sgd_steps(student: Student, theta: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
               lr: torch.Tensor, plan: Plan, steps: range, augment: Augment | None,
               create_graph: bool) -> torch.Tensor:
    """SGD steps ``steps`` of ``plan`` from ``theta``: theta <- theta - lr * grad CE."""
    for k in steps:
        idx = plan.batches[k].to(images.device)
        x = images[idx]
        if plan.augments[k]:
            assert augment is not None  # a plan draws parameters only with an augment
            x = augment.apply(x, plan.augments[k])
        if not create_graph:
            theta = theta.detach().requires_grad_(True)
        loss = F.cross_entropy(student(theta, x), labels[idx])
        (grad,) = torch.autograd.grad(loss, theta, create_graph=create_graph)
        theta = theta - lr * grad if create_graph else (theta - lr * grad).detach()
    return theta


class _Unroll(torch.autograd.Function):
    """Checkpointed unroll: forward keeps boundaries only; backward recomputes segment by
    segment. Inputs (theta0, images, lr) get exact gradients."""

    @staticmethod
    def forward(ctx: Any, theta0: torch.Tensor, images: torch.Tensor, lr: torch.Tensor,
                student: Student, labels: torch.Tensor, plan: Plan, augment: Augment | None,
                segment: int) -> torch.Tensor:
        bounds = list(range(0, len(plan), segment)) + [len(plan)]
        starts = []
        theta = theta0.detach()
        with torch.enable_grad():
            for a, b in zip(bounds[:-1], bounds[1:]):
                starts.append(theta)
                theta = _sgd_steps(student, theta, images.detach(), labels, lr.detach(), plan,
                                   range(a, b), augment, create_graph=False)
        ctx.student, ctx.labels, ctx.plan, ctx.augment = student, labels, plan, augment
        ctx.bounds, ctx.starts = bounds, starts
        ctx.save_for_backward(images, lr)
        return theta.detach()

    @staticmethod
    def backward(ctx: Any, grad_end: torch.Tensor) -> tuple:
        images, lr = ctx.saved_tensors
        g_theta = grad_end
        g_images = torch.zeros_like(images)
        g_lr = torch.zeros_like(lr)
        segments = list(zip(ctx.bounds[:-1], ctx.bounds[1:]))
        for start, (a, b) in reversed(list(zip(ctx.starts, segments))):
            with torch.enable_grad():
                theta0 = start.detach().requires_grad_(True)
                x = images.detach().requires_grad_(True)
                rate = lr.detach().requires_grad_(True)
                end = _sgd_steps(ctx.student, theta0, x, ctx.labels, rate, ctx.plan, range(a, b),
                                 ctx.augment, create_graph=True)
                g_theta, g_x, g_rate = torch.autograd.grad(end, (theta0, x, rate), g_theta,
                                                           allow_unused=True)
            if g_x is not None:
                g_images += g_x
            if g_rate is not None:
                g_lr += g_rate
            del end
        return g_theta, g_images, g_lr, None, None, None, None, None


def unroll(student: Student, theta0: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
           lr: torch.Tensor, plan: Plan, augment: Augment | None = None,
           segment: int | None = None) -> torch.Tensor:
    """The student's parameters after the ``len(plan)`` SGD steps of ``plan`` from ``theta0``
    on ``images`` (normalised, as the network sees them) with learning rate ``lr``.

    Differentiable in ``theta0``, ``images`` and ``lr``. ``segment`` (default
    :func:`default_segment`) is the checkpoint interval; ``segment >= len(plan)`` keeps one
    segment, the memory of a plain unroll.
    """
    if len(plan) == 0:
        return theta0
    segment = int(segment or default_segment(len(plan)))
    if segment < 1:
        raise ValueError(f"unroll segment must be >= 1, got {segment}")
    return _Unroll.apply(theta0, images, lr, student, labels, plan, augment, segment)


def plain_unroll(student: Student, theta0: torch.Tensor, images: torch.Tensor,
                 labels: torch.Tensor, lr: torch.Tensor, plan: Plan,
                 augment: Augment | None = None) -> torch.Tensor:
    """The reference's unroll: one graph over all steps (memory linear in N). For tests and the
    benchmark's comparison."""
    if not theta0.requires_grad:
        theta0 = theta0.detach().requires_grad_(True)
    return _sgd_steps(student, theta0, images, labels, lr, plan, range(len(plan)), augment,
                      create_graph=True)
