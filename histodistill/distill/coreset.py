"""Coreset baselines: real patches chosen per class, not synthesised.

``random`` (seeded), ``herding`` (greedy mean matching on the features of a network trained on
the real set; ResNet18 by default) and ``forgetting`` (after Toneva et al. 2019: count
correct-to-incorrect transitions per sample while training; keep the most forgotten).
"""

from __future__ import annotations

import torch

from histodistill.distill.base import Distiller, register
from histodistill.evaluate import TrainConfig, train


@register("random")
class RandomCoreset(Distiller):
    def run(self, stop_after: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ctx.x[self.random_real().to(self.ctx.device)], self.labels()


def herding_order(features: torch.Tensor, k: int) -> list[int]:
    """Greedily pick ``k`` rows whose running mean stays closest to the mean of all rows."""
    mu = features.mean(0)
    chosen: list[int] = []
    running = torch.zeros_like(mu)
    available = torch.ones(len(features), dtype=torch.bool)
    for n in range(1, k + 1):
        dist = ((mu - (running + features) / n) ** 2).sum(1)
        dist[~available] = float("inf")
        best = int(dist.argmin())
        chosen.append(best)
        available[best] = False
        running += features[best]
    return chosen


class _Trained(Distiller):
    """Coresets that first train a network on the real training set."""

    def trained_net(self, on_epoch=None) -> torch.nn.Module:
        net = self.new_net(self.cfg["net"], self.cfg.get("net_kwargs"))
        train(net, self.ctx.x, self.ctx.y, TrainConfig.from_config(self.cfg["train"]), self.gen,
              on_epoch=on_epoch)
        return net


@register("herding")
class Herding(_Trained):
    def run(self, stop_after: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.trained_net()
        net.eval()
        with torch.no_grad():
            feats = torch.cat([net.embed(b).cpu() for b in self.ctx.x.split(512)])
        rows = torch.cat([idx[herding_order(feats[idx], self.ipc)] for idx in self.by_class])
        return self.ctx.x[rows.to(self.ctx.device)], self.labels()


@register("forgetting")
class Forgetting(_Trained):
    """Keep the samples with the most forgetting events (correct, then wrong, at the next
    presentation). Samples never classified correctly have no events and rank last: on
    slide-level annotations they are mostly label noise at tumour boundaries, and ranking them
    first (as Toneva et al. do) fills a small coreset with mislabelled patches."""

    def run(self, stop_after: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.ctx.x)
        counts = torch.zeros(n)
        previous = torch.zeros(n, dtype=torch.bool)

        def on_epoch(epoch: int, correct: torch.Tensor) -> None:
            nonlocal previous
            counts.add_((previous & ~correct).float())
            previous = correct

        self.trained_net(on_epoch)
        rows = []
        for idx in self.by_class:
            tie_break = torch.randperm(len(idx), generator=self.gen)  # seeded, among equals
            order = sorted(range(len(idx)), key=lambda i: (-counts[idx[i]], tie_break[i]))
            rows.append(idx[order[: self.ipc]])
        return self.ctx.x[torch.cat(rows).to(self.ctx.device)], self.labels()
