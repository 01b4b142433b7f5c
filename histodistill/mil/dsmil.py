"""DSMIL (Li, Li & Eliceiri 2021, binli123/dsmil-wsi): dual-stream MIL.

The instance stream scores every patch with a linear classifier and takes, per class, the
critical instance (the highest-scoring patch). The bag stream maps every patch to a query
(Linear 128, ReLU, Linear 128, Tanh), attends from each patch to the critical instances by the
inner product of their queries (softmax over the bag, scaled by 1/sqrt(128)), pools the patch
features with that attention and scores the pooled feature with a 1-D convolution over the
whole feature (one per class). Training minimises 0.5 x BCE of the bag score + 0.5 x BCE of the
max instance score; a bag's score is the mean of the two sigmoids (the reference's
``--average``). Binary tasks have one output, the positive class (index 1), as DSMIL runs
Camelyon16 (``--num_classes 1``); more classes have one output each (multi-label one-hot, as its
TCGA setting). Weights are initialised orthogonally with zero biases, as in ``train_tcga.py``.

Departure: the reference picks the decision threshold from the ROC curve of the test set
itself; here a binary bag is positive when its score reaches 0.5, otherwise the highest score
wins, so no test label reaches the prediction.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from histodistill.mil.base import BagOutput, MILModel, Optimiser, register


@register("dsmil")
class DSMIL(MILModel):
    def __init__(self, in_dim: int, num_classes: int, cfg: dict[str, Any]) -> None:
        super().__init__(in_dim, num_classes, cfg)
        self.outputs = 1 if num_classes == 2 else num_classes
        q = int(cfg["query_dim"])
        self.instance = nn.Linear(in_dim, self.outputs)
        self.q = (nn.Sequential(nn.Linear(in_dim, q), nn.ReLU(), nn.Linear(q, q), nn.Tanh())
                  if cfg["nonlinear"] else nn.Linear(in_dim, q))
        if cfg["passing_v"]:
            self.v: nn.Module = nn.Sequential(nn.Dropout(float(cfg["dropout_node"])),
                                              nn.Linear(in_dim, in_dim), nn.ReLU())
        else:
            self.v = nn.Identity()
        self.fcc = nn.Conv1d(self.outputs, self.outputs, kernel_size=in_dim)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d)):
                nn.init.orthogonal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, h: torch.Tensor) -> BagOutput:
        scores = self.instance(h)  # (N, C')
        critical = scores.argmax(0)  # the highest-scoring patch of each output
        queries = self.q(h)
        q_max = self.q(h[critical])  # (C', Q)
        attention = (queries @ q_max.T / math.sqrt(queries.shape[1])).softmax(0)  # (N, C')
        pooled = attention.T @ self.v(h)  # (C', D)
        bag = self.fcc(pooled[None]).reshape(-1)  # (C',)
        return BagOutput(bag, attention.T, {"max_instance": scores.max(0).values})

    def _targets(self, label: int, like: torch.Tensor) -> torch.Tensor:
        if self.outputs == 1:
            return torch.tensor([float(label == 1)], device=like.device)
        return F.one_hot(torch.tensor(label), self.outputs).float().to(like.device)

    def loss(self, h: torch.Tensor, label: int) -> tuple[torch.Tensor, BagOutput]:
        out = self(h)
        y = self._targets(label, out.logits)
        bag = F.binary_cross_entropy_with_logits(out.logits, y)
        inst = F.binary_cross_entropy_with_logits(out.extra["max_instance"], y)
        return 0.5 * bag + 0.5 * inst, out

    def scores(self, out: BagOutput) -> torch.Tensor:
        """Per output, the mean of the bag and max-instance sigmoids."""
        return (out.logits.sigmoid() + out.extra["max_instance"].sigmoid()) / 2

    def probabilities(self, out: BagOutput) -> torch.Tensor:
        s = self.scores(out)
        if self.outputs == 1:
            return torch.cat([1 - s, s])
        return s / s.sum().clamp_min(1e-12)

    def optimizer(self) -> torch.optim.Optimizer:
        beta1, beta2 = (float(b) for b in self.cfg["betas"])  # two (the schema's)
        return torch.optim.Adam(self.parameters(), lr=float(self.cfg["lr"]), betas=(beta1, beta2),
                                weight_decay=float(self.cfg["weight_decay"]))

    def scheduler(self, opt: Optimiser, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
        """Cosine annealing over the epochs down to ``min_lr`` (5e-6), as ``train_tcga.py``."""
        assert isinstance(opt, torch.optim.Optimizer)  # this model's optimizer(): Adam
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs,
                                                          float(self.cfg["min_lr"]))
