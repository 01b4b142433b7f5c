"""SLFD, stochastic latent feature distillation (Li et al. 2025, "Dataset Distillation with
Probabilistic Latent Features", arXiv 2505.06647): GLaD (:mod:`.glad`) whose synthetic batch is
scored by a stochastic loss whose distribution is defined through the generator.

A module of three linear layers reads, per image, its latent and the generator's intermediate
features (the decoder's first part, :meth:`AutoencoderKL.first_features`), each averaged over
space, and predicts the mean shift mu, the diagonal d and a rank-r factor F (C x r, r at most the
number of classes C) of a low-rank multivariate normal over the C class logits
(``LowRankMultivariateNormal``, covariance diag(d) + F F^T), centred on the matching network's
logits: eta ~ N(logits + mu, diag(d) + F F^T). Its input comes from the generator, not from the
matching network, which is freshly initialised every iteration: what the module learns carries
from one network to the next. The variance is bounded: d lies in [``min_var``, ``max_var``]
(a sigmoid) and every entry of F in +-sqrt(``max_var`` / r) (a tanh).

With M Monte Carlo samples eta_m the loss is the negative log of the mean likelihood of the
label, -log(1/M sum_m softmax(eta_m)[y]) = log M - logsumexp_m log softmax(eta_m)[y]
(Stochastic Segmentation Networks' loss, Monteiro et al. 2020), averaged over the batch. Its
gradient on the synthetic images is matched to the real batch's cross-entropy gradient. The
module is optimised with the latents by the matching loss, in the same optimiser and the same
way (``unit_grad``: unit-norm steps per parameter tensor, at ``lr_module``).

Details the paper's text available here does not fix, chosen as follows: the mean and factor
layers start at zero and the diagonal at ``init_var`` (so SLFD starts as GLaD), rank 10 and M 20
(the Stochastic Segmentation Networks defaults). Samples are drawn from generators seeded by the
run's seed (resumable).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.distributions import LowRankMultivariateNormal

from histodistill.distill.base import register
from histodistill.distill.glad import GLaD


class StochasticHead(nn.Module):
    """Three linear layers: conditioning features (B, D) -> mean shift (B, C), diagonal (B, C)
    in [min_var, max_var], covariance factor (B, C, rank) with entries in +-sqrt(max_var / rank)."""

    def __init__(self, dim: int, classes: int, rank: int, *, init_var: float, min_var: float,
                 max_var: float) -> None:
        super().__init__()
        if not min_var < init_var < max_var:
            raise ValueError(f"distill.methods.slfd: init_var {init_var} must lie between "
                             f"min_var {min_var} and max_var {max_var}")
        self.classes, self.rank = classes, min(rank, classes)
        self.min_var, self.max_var = min_var, max_var
        self.mean = nn.Linear(dim, classes)
        self.log_diag = nn.Linear(dim, classes)
        self.factor = nn.Linear(dim, classes * self.rank)
        for layer in (self.mean, self.log_diag, self.factor):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        share = (init_var - min_var) / (max_var - min_var)
        nn.init.constant_(self.log_diag.bias, math.log(share / (1 - share)))

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> LowRankMultivariateNormal:
        """The distribution of the logits of each image: N(logits + mu, diag(d) + F F^T), held
        in float64 (the capacitance matrix's Cholesky factorisation is then safe at any d)."""
        factor = torch.tanh(self.factor(features)) * math.sqrt(self.max_var / self.rank)
        factor = factor.view(len(features), self.classes, self.rank)
        diag = self.min_var + (self.max_var - self.min_var) * torch.sigmoid(self.log_diag(features))
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
        with torch.no_grad():
            dim = self.condition(self.images[:1]).shape[1]
        self.head = StochasticHead(dim, self.ctx.num_classes, int(c["rank"]),
                                   init_var=float(c["init_var"]), min_var=float(c["min_var"]),
                                   max_var=float(c["max_var"])).to(self.ctx.device)
        if not c["learn_shift"]:  # the ablation: the module learns the covariance only
            self.head.mean.requires_grad_(False)
        self.opt.add_param_group({"params": list(self.head.parameters()),
                                  "lr": float(c["lr_module"])})
        self._cond: torch.Tensor | None = None

    def condition(self, latents: torch.Tensor) -> torch.Tensor:
        """The module's input: each latent and the generator's intermediate features of it,
        averaged over space and concatenated (B, z_channels + feature channels)."""
        return torch.cat([latents.mean((2, 3)), self.ae.first_features(latents).mean((2, 3))], 1)

    def syn(self, c: int) -> torch.Tensor:
        """Class ``c``'s images as network inputs; keeps their conditioning for :meth:`syn_loss`
        (the siamese augmentation changes the images the network sees, not their latents)."""
        latents = self.images[self.syn_slice(c)]
        self._cond = self.condition(latents)
        return self.to_net(latents)

    def syn_loss(self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._cond is None or len(self._cond) != len(x):
            raise RuntimeError("slfd: syn_loss called without the batch's latents (syn(c) first)")
        dist = self.head(self._cond, net(x))
        seed = int(torch.randint(2**31 - 1, (1,), generator=self.gen))
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return stochastic_cross_entropy(dist, y, int(self.cfg["mc_samples"]))

    def extra_state(self) -> dict[str, Any]:
        return {"head": {k: v.detach().cpu() for k, v in self.head.state_dict().items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
