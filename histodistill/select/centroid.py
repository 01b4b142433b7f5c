"""HistoDiffusion's selection of synthetic samples (Ye et al., MICCAI 2023; karenyyy/HistoDiffAug
``selective_filtering.py``): in the encoder's feature space, L2-normalised, keep the samples of
the class that the real-data classifier assigns to it with probability at least ``confidence``
and (``nearest_centroid``, the reference's criterion) whose nearest real class centroid is
their own; among those, the ones closest to their class's centroid come first.

The class centroids are means of the normalised features of the real training patches,
accumulated batch by batch (constant memory). The reference filters by nearest centroid alone;
the probability threshold is this project's spec, computed by the ``supervised`` encoder's head.
When fewer samples pass than the budget asks for, the budget is filled with the closest of the
others (logged), so every class gets exactly its budget.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from histodistill.data.stream import iterate
from histodistill.data.store import PatchStore
from histodistill.encoders import Encoder
from histodistill.select.base import Selector, register

log = logging.getLogger(__name__)


def normalised(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (HistoDiffAug's ``normalize_tensor``)."""
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10)


def class_centroids(encoder: Encoder, store: PatchStore, split: str = "train", batch: int = 256
                    ) -> np.ndarray:
    """(C, D) means of the normalised features of each class's patches in ``split``, streamed."""
    sums = np.zeros((len(store.class_names), encoder.dim))
    counts = np.zeros(len(store.class_names))
    with torch.no_grad():
        for x, y, _ in iterate(store, split, batch, None):
            f = normalised(encoder.embed(torch.from_numpy(x)).double().cpu().numpy())
            np.add.at(sums, y, f)
            counts += np.bincount(y, minlength=len(counts))
    if (counts == 0).any():
        missing = [store.class_names[c] for c in np.flatnonzero(counts == 0)]
        raise ValueError(f"{store.path}: no {split} patches of classes {missing}")
    return sums / counts[:, None]


def ranking(features: np.ndarray, probs: np.ndarray, centroids: np.ndarray, c: int,
            confidence: float, nearest_centroid: bool) -> tuple[np.ndarray, int]:
    """Order of class-``c`` candidates (normalised ``features``, ``probs`` (n, C)): those that pass
    the filters by distance to centroid ``c``, then the rest by distance; and how many pass."""
    dist = ((features[:, None, :] - centroids[None]) ** 2).sum(-1)  # (n, C)
    passed = probs[:, c] >= confidence
    if nearest_centroid:
        passed &= dist.argmin(1) == c
    order = np.lexsort((np.arange(len(dist)), dist[:, c], ~passed))  # passed first, then closest
    return order, int(passed.sum())


@register("centroid")
class Centroid(Selector):
    """Settings: ``confidence`` (minimum class probability), ``nearest_centroid``."""

    def __init__(self, cfg: dict[str, Any], ctx: Any) -> None:
        super().__init__(cfg, ctx)
        self._centroids: np.ndarray | None = None
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}

    def rank(self, c: int) -> tuple[np.ndarray, np.ndarray, int]:
        if self._centroids is None:
            assert self.ctx.encoder is not None  # the workflow gives centroid one (select_encoder)
            self._centroids = class_centroids(self.ctx.encoder, self.ctx.real)
        if c not in self._cache:
            pos = self.ctx.pool.of_class(c)
            order, passed = ranking(normalised(self.ctx.pool.features[pos]),
                                    self.ctx.pool.probabilities[pos], self._centroids, c,
                                    float(self.cfg["confidence"]), bool(self.cfg["nearest_centroid"]))
            self._cache[c] = (pos, order, passed)
        return self._cache[c]

    def select(self, c: int, k: int) -> np.ndarray:
        pos, order, passed = self.rank(c)
        if passed < k:
            log.warning("class %d: %d of %d candidates pass the confidence filter, fewer than the "
                        "budget %d; the closest of the others fill it", c, passed, len(pos), k)
        return pos[order[:k]]
