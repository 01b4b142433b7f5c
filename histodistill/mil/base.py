"""One interface for every slide-level MIL model, registered by name like the distillers.

A model takes one bag, the (N, D) features of a slide's patches, and returns a
:class:`BagOutput`: bag logits and, where the model has one, its attention over the patches
(K rows of N weights, each summing to one). Each model also says how it is trained, as its
reference code does: its loss for one bag (:meth:`MILModel.loss`), its class probabilities
for testing (:meth:`MILModel.probabilities`), and its optimiser and schedule
(:meth:`MILModel.optimizer`). Settings arrive as one dict (config ``mil.settings.<model>``);
the training loop (:mod:`histodistill.mil.train`) is the same for all.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from histodistill.registry import registrar

MODELS: dict[str, type["MILModel"]] = {}


register = registrar(MODELS)


class Optimiser(Protocol):
    """What the training loop calls on a model's optimiser: a torch optimiser, or a wrapper
    with the same methods (TransMIL's Lookahead)."""

    def step(self) -> Any: ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...


@dataclass
class BagOutput:
    """What a model computes for one bag."""

    logits: torch.Tensor  # (C,) bag scores (the model's own meaning; see probabilities)
    attention: torch.Tensor | None  # (K, N), each row sums to 1 over the bag; None: no attention
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # what the model's loss needs


class MILModel(nn.Module, ABC):
    """Base class: a bag of features in, bag logits out."""

    name = ""

    def __init__(self, in_dim: int, num_classes: int, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.in_dim, self.num_classes, self.cfg = in_dim, num_classes, cfg

    @abstractmethod
    def forward(self, h: torch.Tensor) -> BagOutput:  # type: ignore[override]
        """``h``: (N, D) features of one bag."""

    def loss(self, h: torch.Tensor, label: int) -> tuple[torch.Tensor, BagOutput]:
        """The training loss of one bag (cross-entropy unless the model says otherwise)."""
        out = self(h)
        return F.cross_entropy(out.logits[None], _target(label, out.logits)), out

    def probabilities(self, out: BagOutput) -> torch.Tensor:
        """(C,) class probabilities of a bag, for predictions and metrics."""
        return out.logits.softmax(-1)

    def optimizer(self) -> Optimiser:
        """The reference's optimiser (Adam with ``lr`` and ``weight_decay`` by default)."""
        return torch.optim.Adam(self.parameters(), lr=float(self.cfg["lr"]),
                                weight_decay=float(self.cfg["weight_decay"]))

    def scheduler(self, opt: Optimiser, epochs: int) -> torch.optim.lr_scheduler.LRScheduler | None:
        """A per-epoch learning-rate schedule of the model's ``optimizer()``, or None (constant)."""
        return None


def _target(label: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([label], device=like.device)


def build(name: str, in_dim: int, num_classes: int, cfg: dict[str, Any]) -> MILModel:
    """Instantiate model ``name``; an unknown name lists the registered ones."""
    if name not in MODELS:
        raise KeyError(f"unknown MIL model {name!r}; available: {sorted(MODELS)}")
    return MODELS[name](in_dim, num_classes, cfg)
