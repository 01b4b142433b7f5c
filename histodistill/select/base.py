"""One interface for selecting images per class from a pool, with a registry.

The pool is the training split of a patch store: a synthetic store written by
``sample_synthetic`` (``results/<dataset>/synthetic/<generator>.zarr``) or, for InfoDist's "real
distilled" variant, the dataset's own patch store. :class:`Candidates` holds the pool's rows and
labels and computes the encoder's features and class probabilities once, streamed from the store
(only features are held, never the pool's pixels). A :class:`Selector` returns, for a class and a
budget k, k positions into the candidates; selectors rank or partition a class once and cache
it, so the augmentation study's several budgets cost one pass.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from histodistill.data.stream import iterate, read_rows
from histodistill.data.store import PatchStore
from histodistill.encoders import Encoder
from histodistill.registry import registrar

SELECTORS: dict[str, type["Selector"]] = {}
log = logging.getLogger(__name__)


register = registrar(SELECTORS)


def class_seed(seed: int, c: int) -> int:
    """A positive 31-bit seed for class ``c`` derived from the run's seed."""
    return int(np.random.SeedSequence([seed, c]).generate_state(1)[0] % (2**31 - 1)) + 1


class Candidates:
    """The training rows of ``store`` (at most ``per_class`` seeded rows per class when > 0),
    with features and probabilities of ``encoder`` computed on first use."""

    def __init__(self, store: PatchStore, encoder: Encoder | None, *, per_class: int, seed: int,
                 batch: int = 256) -> None:
        self.store, self.encoder, self.batch = store, encoder, batch
        rows = store.indices("train")
        labels = store.array("label")[rows]
        if per_class:
            keep = [np.sort(np.random.default_rng([seed, c]).permutation(rows[labels == c])[:per_class])
                    for c in range(len(store.class_names))]
            rows = np.sort(np.concatenate(keep))
            labels = store.array("label")[rows]
        self.rows, self.labels = rows, labels
        self._features: np.ndarray | None = None
        self._probs: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.store.class_names)

    def of_class(self, c: int) -> np.ndarray:
        """Positions (into :attr:`rows`) of class ``c``."""
        return np.flatnonzero(self.labels == c)

    def _embed(self) -> None:
        if self.encoder is None:
            raise ValueError("this selection needs an encoder (select.encoder)")
        feats, probs = [], []
        with torch.no_grad():
            for x, _, _ in iterate(self.store, "train", self.batch, None, rows=self.rows):
                pixels = torch.from_numpy(x)
                feats.append(self.encoder.embed(pixels).double().cpu().numpy())
                if self.encoder.kind == "supervised":
                    probs.append(self.encoder.probabilities(pixels).double().cpu().numpy())
        self._features = np.concatenate(feats)
        self._probs = np.concatenate(probs) if probs else None

    @property
    def features(self) -> np.ndarray:
        """(N, D) encoder features, aligned with :attr:`rows`."""
        if self._features is None:
            self._embed()
        assert self._features is not None  # set by _embed (or it raised)
        return self._features

    @property
    def probabilities(self) -> np.ndarray:
        """(N, C) class probabilities of a supervised encoder's head."""
        if self._features is None:
            self._embed()
        if self._probs is None:
            assert self.encoder is not None  # _embed, which needs one, has run
            raise ValueError(f"a {self.encoder.kind} encoder has no classifier head; centroid "
                             "selection needs the supervised encoder")
        return self._probs

    def pixels(self, positions: np.ndarray) -> np.ndarray:
        """uint8 (n, 3, H, W) patches at ``positions``, in that order."""
        return read_rows(self.store, self.rows[positions])


@dataclass
class Context:
    """What a selector may use: the candidates, the real store (for reference statistics), the
    encoder and the run's seed."""

    pool: Candidates
    real: PatchStore
    encoder: Encoder | None
    seed: int


class Selector(ABC):
    """Subclasses set ``name`` via :func:`register` and implement :meth:`select`."""

    name = ""

    def __init__(self, cfg: dict[str, Any], ctx: Context) -> None:
        self.cfg, self.ctx = cfg, ctx

    @abstractmethod
    def select(self, c: int, k: int) -> np.ndarray:
        """``k`` distinct positions into the candidates, all of class ``c``."""


def build(name: str, cfg: dict[str, Any], ctx: Context) -> Selector:
    if name not in SELECTORS:
        raise KeyError(f"unknown selector {name!r}; available: {sorted(SELECTORS)}")
    return SELECTORS[name](cfg, ctx)


@register("random")
class RandomSelector(Selector):
    """``k`` seeded random candidates of the class (the control of the comparisons)."""

    def select(self, c: int, k: int) -> np.ndarray:
        pos = self.ctx.pool.of_class(c)
        return pos[np.random.default_rng([self.ctx.seed, c]).permutation(len(pos))[:k]]
