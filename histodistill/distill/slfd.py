"""SLFD, stochastic latent feature distillation (Li et al. 2025, "Dataset Distillation with
Probabilistic Latent Features", arXiv 2505.06647): GLaD (:mod:`.glad`) whose synthetic batch is
scored by a stochastic loss.

A module of three linear layers on the matching network's features f predicts, per image, the
mean shift mu(f), the log covariance diagonal log d(f) and a rank-r covariance factor F(f) (C x r)
of a low-rank multivariate normal over the C class logits (``LowRankMultivariateNormal``,
covariance diag(d) + F F^T), centred on the classifier's logits: eta ~ N(logits + mu, diag(d) +
F F^T). With M Monte Carlo samples eta_m the loss is the negative log of the mean likelihood of
the label, -log(1/M sum_m softmax(eta_m)[y]) = log M - logsumexp_m log softmax(eta_m)[y]
(Stochastic Segmentation Networks' loss, Monteiro et al. 2020), averaged over the batch. Its
gradient on the synthetic images is matched to the real batch's cross-entropy gradient, and the
module is optimised with the latents by the matching loss.

Details the paper's text available here does not fix, chosen as follows: the mean and factor
layers start at zero and the diagonal at ``init_var`` (so SLFD starts as GLaD), the module takes
SGD steps with momentum 0.5 at ``lr_module``, rank 10 and M 20 (the Stochastic Segmentation
Networks defaults). Samples are drawn from generators seeded by the run's seed (resumable).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.distributions import LowRankMultivariateNormal

from histodistill import models
from histodistill.distill.base import register
from histodistill.distill.glad import GLaD


class StochasticHead(nn.Module):
    """Three linear layers: features (B, D) -> mean shift (B, C), log diagonal (B, C), covariance
    factor (B, C, rank)."""

    def __init__(self, dim: int, classes: int, rank: int, init_var: float = 1e-2,
                 min_var: float = 1e-5) -> None:
        super().__init__()
        self.classes, self.rank, self.min_var = classes, rank, min_var
        self.mean = nn.Linear(dim, classes)
        self.log_diag = nn.Linear(dim, classes)
        self.factor = nn.Linear(dim, classes * rank)
        for layer in (self.mean, self.log_diag, self.factor):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.constant_(self.log_diag.bias, math.log(init_var))

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> LowRankMultivariateNormal:
        """The distribution of the logits of each image: N(logits + mu, diag(d) + F F^T), the
        diagonal floored at ``min_var`` (as Stochastic Segmentation Networks' epsilon). The
        distribution is held in float64: with the diagonal near its floor the capacitance matrix
        I + F^T D^-1 F has entries of 1e7 and more, and its float32 Cholesky factorisation failed
        on the WSI demo although the matrix is positive definite (eigenvalues >= 1)."""
        factor = self.factor(features).view(len(features), self.classes, self.rank)
        diag = self.log_diag(features).clamp(max=20).exp() + self.min_var
        return LowRankMultivariateNormal((logits + self.mean(features)).double(), factor.double(),
                                         diag.double())


def stochastic_cross_entropy(dist: LowRankMultivariateNormal, y: torch.Tensor, samples: int
                             ) -> torch.Tensor:
    """mean_b [log M - logsumexp_m log softmax(eta_mb)[y_b]] over M reparameterised samples."""
    eta = dist.rsample((samples,)).float()  # (M, B, C)
    logp = torch.log_softmax(eta, -1).gather(-1, y.expand(samples, -1).unsqueeze(-1)).squeeze(-1)
    return (math.log(samples) - torch.logsumexp(logp, 0)).mean()


@register("slfd")
class SLFD(GLaD):
    def init_state(self) -> None:
        super().init_state()
        c = self.cfg
        with torch.random.fork_rng(devices=[]):  # a throwaway network, only for its feature size
            dim = models.build(c["net"], self.ctx.num_classes, self.ctx.im_size,
                               **c.get("net_kwargs", {})).head.in_features
        self.head = StochasticHead(dim, self.ctx.num_classes, int(c["rank"]),
                                   float(c["init_var"])).to(self.ctx.device)
        self.opt.add_param_group({"params": list(self.head.parameters()),
                                  "lr": float(c["lr_module"])})

    def syn_loss(self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        features = net.embed(x)
        dist = self.head(features, net.head(features))
        seed = int(torch.randint(2**31 - 1, (1,), generator=self.gen))
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return stochastic_cross_entropy(dist, y, int(self.cfg["mc_samples"]))

    def extra_state(self) -> dict[str, Any]:
        return {"head": {k: v.detach().cpu() for k, v in self.head.state_dict().items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
