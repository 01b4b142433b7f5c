"""Coreset baselines: real patches chosen per class, not synthesised.

``random`` (seeded), ``herding`` (greedy mean matching on the features of a network trained on
the real set) and ``forgetting`` (after Toneva et al. 2019: count correct-to-incorrect
transitions per sample while training; keep the most forgotten). Histo-DD uses ResNet18 for
both. Training and feature extraction stream the split from the store.
"""

from __future__ import annotations

import numpy as np
import torch

from histodistill import models
from histodistill.augment import Augment, AugmentConfig
from histodistill.distill.base import Distiller, register
from histodistill.training import TrainConfig, train


class _Coreset(Distiller):
    """Coresets return real store rows: ``select`` picks them, class by class."""

    real_patches = True

    def select(self) -> np.ndarray:
        raise NotImplementedError

    def run(self, stop_after: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self.source_rows = self.select()
        return self.ctx.real.pixels_of(self.source_rows), self.labels()


@register("random")
class RandomCoreset(_Coreset):
    def select(self) -> np.ndarray:
        return self.random_rows()


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


class _Trained(_Coreset):
    """Coresets that first train a network on the real training split (streamed, per-image
    augmentation)."""

    def trained_net(self, on_epoch=None) -> models.Classifier:
        net = self.new_net(self.cfg["net"], self.cfg.get("net_kwargs"))
        real = self.ctx.real
        cfg = TrainConfig.from_config(self.cfg["train"])
        aug = Augment(AugmentConfig.from_config(self.cfg["augment"]),
                      self.ctx.template, real.stats.mean, real.stats.std)
        train(net, lambda epoch: real.epoch(cfg.batch, self.ctx.seed * 100003 + epoch), cfg,
              self.gen, aug, on_epoch=on_epoch, progress=self.ctx.progress,
              setting=f"distill.methods.{self.name}.train.epochs")
        return net


@register("herding")
class Herding(_Trained):
    def select(self) -> np.ndarray:
        net = self.trained_net()
        net.eval()
        feats, rows, labels = [], [], []
        for x, y, r in self.ctx.real.epoch(512, None):
            with torch.no_grad():
                feats.append(net.embed(x).cpu())
            labels.append(y.cpu())
            rows.append(r)
        feat, row, label = torch.cat(feats), torch.cat(rows), torch.cat(labels)
        chosen = []
        for c in range(self.ctx.num_classes):
            idx = torch.nonzero(label == c).flatten()
            chosen.append(row[idx[herding_order(feat[idx], self.ipcs[c])]])
        return torch.cat(chosen).numpy()


@register("forgetting")
class Forgetting(_Trained):
    """Keep the samples with the most forgetting events (correct, then wrong, at the next
    presentation). Samples never classified correctly have no events and rank last: on
    slide-level annotations they are mostly label noise at tumour boundaries, and ranking them
    first (as Toneva et al. do) fills a small coreset with mislabelled patches."""

    def select(self) -> np.ndarray:
        n = len(self.ctx.real.store)
        counts = np.zeros(n, np.int32)
        previous = np.zeros(n, bool)

        def on_epoch(epoch: int, rows: torch.Tensor, correct: torch.Tensor) -> None:
            r, ok = rows.numpy(), correct.numpy()
            counts[r] += previous[r] & ~ok
            previous[r] = ok

        self.trained_net(on_epoch)
        labels = self.ctx.real.store.array("label")
        split = self.ctx.real.store.array("split")
        member = np.zeros(n, bool)
        chosen = []
        for _, _, r in self.ctx.real.epoch(4096, None):
            member[r.numpy()] = True
        for c in range(self.ctx.num_classes):
            idx = np.flatnonzero(member & (labels == c) & (split >= 0))
            tie_break = torch.randperm(len(idx), generator=self.gen).numpy()  # seeded, among equals
            order = np.lexsort((tie_break, -counts[idx]))
            chosen.append(idx[order[: self.ipcs[c]]])
        return np.concatenate(chosen)
