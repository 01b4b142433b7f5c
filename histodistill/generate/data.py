"""Real patches for the generator stages, streamed from one or several patch stores.

Each (store, split) gets a :class:`~histodistill.data.stream.ClassSampler` (the whole split when it fits
its share of ``cache_mb``, otherwise a refreshed reservoir), so no split is ever loaded beyond the
budget. A batch draws each row's source in proportion to the sources' sizes, so pooled stores are
sampled uniformly by patch. Images come out in [-1, 1] (the autoencoder's range).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from histodistill.data.stream import ClassSampler
from histodistill.data.store import SPLITS, PatchStore
from histodistill.io import InputError

Sources = list[tuple[str, list[str]]]


def sources(store: str | os.PathLike, pretrain: Sources | None = None) -> Sources:
    """The dataset's training split, then the pooled stores' splits."""
    return [(str(store), ["train"]), *[(str(p), list(s)) for p, s in (pretrain or [])]]


def pooled(stores: list[str]) -> Sources:
    """Pooled stores with every split (their labels are not used)."""
    return [(str(s), ["train", "val", "test"]) for s in stores]


class PatchSource:
    """Random batches over ``inputs`` = [(store path, [splits])], with labels of the first
    store's classes (pooled stores' labels are only meaningful for their own store)."""

    def __init__(self, inputs: Sources, cache_mb: float, seed: int, device: torch.device,
                 stage: str) -> None:
        self.device = device
        pairs = []
        for path, splits in inputs:
            store = PatchStore(path)
            for split in splits:
                if split not in SPLITS:
                    raise InputError(stage, path, f"unknown split {split!r}; use {list(SPLITS)}")
                if (store.array("split") == SPLITS.index(split)).any():
                    pairs.append((store, split))
        if not pairs:
            raise InputError(stage, inputs[0][0], "no patches in the requested splits")
        size = int(pairs[0][0].attrs["patch_size"])
        for store, _ in pairs:
            if int(store.attrs["patch_size"]) != size:
                raise InputError(stage, store.path, f"patch size {store.attrs['patch_size']} "
                                 f"differs from {size} px of {pairs[0][0].path}; pooled stores "
                                 "must share one patch size")
        counts = np.array([(s.array("split") == SPLITS.index(sp)).sum() for s, sp in pairs], float)
        self.weights = counts / counts.sum()
        self.samplers = []
        for k, ((store, split), w) in enumerate(zip(pairs, self.weights)):
            try:
                self.samplers.append(ClassSampler(store, split, max(cache_mb * w, 1.0),
                                                  seed * 7919 + k))
            except ValueError as err:  # a class without patches in a pooled split
                raise InputError(stage, store.path, str(err)) from None
        self.image_size = size
        self.class_names = pairs[0][0].class_names
        self._rng = np.random.default_rng([seed, 17])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` random patches in [-1, 1] (float, on the device) and their labels."""
        which = self._rng.choice(len(self.samplers), n, p=self.weights)
        x = np.empty((n, 3, self.image_size, self.image_size), np.uint8)
        y = np.empty(n, np.int64)
        for k, sampler in enumerate(self.samplers):
            where = np.flatnonzero(which == k)
            if len(where):
                x[where], y[where] = sampler.mixed(len(where))
        return to_unit(torch.from_numpy(x).to(self.device)), torch.from_numpy(y).to(self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.bit_generator.state,
                "samplers": [s.state_dict() for s in self.samplers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["samplers"]) != len(self.samplers):
            raise ValueError("checkpoint was written for other sources")
        for sampler, sub in zip(self.samplers, state["samplers"]):
            sampler.load_state_dict(sub)
        self._rng.bit_generator.state = state["rng"]


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to floats in [-1, 1]."""
    return pixels.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] to uint8 pixels (N, 3, H, W) on the CPU."""
    return ((images.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
