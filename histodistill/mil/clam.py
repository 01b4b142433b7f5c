"""CLAM (Lu et al. 2021, mahmoodlab/CLAM): gated attention pooling with instance-level
clustering.

A bag's features pass a fully connected layer (``in_dim`` -> 512, ReLU, dropout), then gated
attention (tanh and sigmoid branches to 256, multiplied, a linear score per branch). CLAM-SB has
one attention branch and a linear bag classifier on the pooled feature; CLAM-MB one branch and
one single-logit classifier per class. The clustering loss takes, in the attention branch of the
bag's class, the ``k_sample`` patches of highest attention as positives and the ``k_sample`` of
lowest as negatives of that class's instance classifier (two logits); with ``subtyping`` the
other classes' top patches are negatives of their classifiers too. The training loss is
``bag_weight`` x bag cross-entropy + (1 - bag_weight) x instance loss, the instance loss being
the smooth top-1 SVM (``inst_loss: svm``, CLAM's README command) or cross-entropy.

Departure: CLAM's code fails on a bag smaller than ``k_sample`` (and lets the top and bottom
sets overlap below ``2 k_sample``); here ``k = min(k_sample, N // 2)`` so the two sets never
share a patch (per-slide synthetic bags can hold 10 patches), and a one-patch bag has no
instance loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from histodistill.mil.base import BagOutput, MILModel, register

SIZES = {"small": (512, 256), "big": (512, 384)}


def smooth_top1_svm(logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0,
                    tau: float = 1.0) -> torch.Tensor:
    """Smooth top-1 SVM loss (Berrada et al. 2018; CLAM's ``inst_loss svm``), mean over rows:
    tau * logsumexp((s_j + alpha [j != y] - s_y) / tau)."""
    margin = torch.full_like(logits, alpha)
    margin.scatter_(1, target[:, None], 0.0)
    z = (logits + margin - logits.gather(1, target[:, None])) / tau
    return (tau * torch.logsumexp(z, dim=1)).mean()


class GatedAttention(nn.Module):
    """CLAM's Attn_Net_Gated: a = tanh(W_a h), b = sigmoid(W_b h), scores = W_c (a * b)."""

    def __init__(self, dim: int, hidden: int, branches: int, dropout: bool) -> None:
        super().__init__()
        drop = [nn.Dropout(0.25)] if dropout else []
        self.a = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), *drop)
        self.b = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), *drop)
        self.c = nn.Linear(hidden, branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(h) * self.b(h))  # (N, branches)


class _CLAM(MILModel):
    multi_branch = False  # one attention branch per class (CLAM-MB) or one for the bag

    def __init__(self, in_dim: int, num_classes: int, cfg: dict[str, Any]) -> None:
        super().__init__(in_dim, num_classes, cfg)
        self.branches = num_classes if self.multi_branch else 1
        dim, hidden = SIZES[cfg["size"]]
        dropout = float(cfg["dropout"])
        self.fc = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(dim, hidden, self.branches, dropout > 0)
        self.instance_classifiers = nn.ModuleList(nn.Linear(dim, 2) for _ in range(num_classes))
        self.k_sample = int(cfg["k_sample"])
        self.bag_weight = float(cfg["bag_weight"])
        self.subtyping = bool(cfg["subtyping"])
        self.inst_loss = cfg["inst_loss"]

    def pool(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hidden features (N, 512), attention (K, N) summing to one per row, pooled (K, 512)."""
        hidden = self.fc(h)
        attention = self.attention(hidden).T.softmax(dim=1)
        return hidden, attention, attention @ hidden

    def instance_ids(self, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The patches of one attention row the clustering loss uses: the k of highest attention
        and the k of lowest, k = min(k_sample, N // 2)."""
        k = min(self.k_sample, len(attention) // 2)
        return attention.topk(k).indices, (-attention).topk(k).indices

    def _criterion(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.inst_loss == "svm":
            return smooth_top1_svm(logits, target)
        return F.cross_entropy(logits, target)

    def instance_loss(self, hidden: torch.Tensor, attention: torch.Tensor, label: int
                      ) -> torch.Tensor:
        """CLAM's clustering loss for a bag of class ``label``."""
        total, used = hidden.new_zeros(()), 0
        for c, classifier in enumerate(self.instance_classifiers):
            row = attention[c if self.branches > 1 else 0]
            top, bottom = self.instance_ids(row)
            if not len(top):
                continue
            if c == label:  # in the class: top patches positive, bottom negative
                x = torch.cat([hidden[top], hidden[bottom]])
                y = torch.cat([torch.ones(len(top)), torch.zeros(len(bottom))]).long()
            elif self.subtyping:  # out of the class: its top patches are negatives
                x, y = hidden[top], torch.zeros(len(top)).long()
            else:
                continue
            total = total + self._criterion(classifier(x), y.to(x.device))
            used += 1
        return total / used if self.subtyping and used else total

    def loss(self, h: torch.Tensor, label: int) -> tuple[torch.Tensor, BagOutput]:
        out = self(h)
        bag = F.cross_entropy(out.logits[None], torch.tensor([label], device=h.device))
        inst = self.instance_loss(out.extra["hidden"], out.attention, label)
        return self.bag_weight * bag + (1 - self.bag_weight) * inst, out


@register("clam_sb")
class CLAMSB(_CLAM):
    """CLAM single-branch: one attention over the bag, one linear bag classifier."""

    def __init__(self, in_dim: int, num_classes: int, cfg: dict[str, Any]) -> None:
        super().__init__(in_dim, num_classes, cfg)
        self.classifier = nn.Linear(SIZES[cfg["size"]][0], num_classes)

    def forward(self, h: torch.Tensor) -> BagOutput:
        hidden, attention, pooled = self.pool(h)
        return BagOutput(self.classifier(pooled[0]), attention, {"hidden": hidden})


@register("clam_mb")
class CLAMMB(_CLAM):
    """CLAM multi-branch: one attention branch and one single-logit classifier per class."""

    multi_branch = True

    def __init__(self, in_dim: int, num_classes: int, cfg: dict[str, Any]) -> None:
        super().__init__(in_dim, num_classes, cfg)
        dim = SIZES[cfg["size"]][0]
        self.classifiers = nn.ModuleList(nn.Linear(dim, 1) for _ in range(num_classes))

    def forward(self, h: torch.Tensor) -> BagOutput:
        hidden, attention, pooled = self.pool(h)
        logits = torch.cat([clf(pooled[c]) for c, clf in enumerate(self.classifiers)])
        return BagOutput(logits, attention, {"hidden": hidden})
