"""Real patches as networks see them: normalised with the dataset's channel statistics, streamed
from the patch store, on the device.

:class:`Stats` holds the per-channel mean and std that the patch store records when it is built
(``channel_mean``, ``channel_std`` over the training split). Networks always receive
``(x - mean) / std``; synthetic images live in that space or in pixels, as each method's reference
keeps them. :class:`RealData` wraps a :class:`~histodistill.data.stream.ClassSampler` so
distillation draws class-balanced batches without ever loading a split. :func:`device_batches`
turns a stream of uint8 batches into network inputs on the device, read ahead by a worker thread
(pinned memory and asynchronous copies on CUDA).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
import torch

from histodistill.data.stream import (PREFETCH, ClassSampler, Epoch, channel_stats, iterate,
                                      prefetch)
from histodistill.data.store import PatchStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stats:
    """Per-channel mean and std of pixels in [0, 1]: the network's input normalisation."""

    # three values, one per channel: a tuple, or the lists channel_stats computes
    mean: Sequence[float]
    std: Sequence[float]

    @classmethod
    def from_store(cls, store: PatchStore) -> "Stats":
        """The statistics the store recorded; computed (streaming) for stores made before they
        were recorded."""
        if "channel_mean" in store.attrs:
            return cls(tuple(store.attrs["channel_mean"]), tuple(store.attrs["channel_std"]))
        log.info("%s records no channel statistics; computing them from the training split",
                 store.path)
        return cls(*channel_stats(store, "train"))

    def _t(self, values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=like.device).reshape(1, 3, 1, 1)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] (float) or uint8 to network inputs."""
        if pixels.dtype == torch.uint8:
            pixels = pixels.float().div_(255)
        return (pixels - self._t(self.mean, pixels)) / self._t(self.std, pixels)

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Network inputs back to pixels in [0, 1] (unclamped)."""
        return x * self._t(self.std, x) + self._t(self.mean, x)

    def bounds(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid range of normalised inputs, per channel: where pixels 0 and 1 land."""
        zero = torch.zeros(1, 3, 1, 1, device=like.device)
        return self.normalise(zero), self.normalise(zero + 1)


@overload
def device_batches(batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
                   prepare: Callable[[torch.Tensor], torch.Tensor], dev: torch.device,
                   depth: int = ...) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    ...


@overload
def device_batches(batches: Iterable[tuple[np.ndarray, np.ndarray, None]],
                   prepare: Callable[[torch.Tensor], torch.Tensor], dev: torch.device,
                   depth: int = ...) -> Iterator[tuple[torch.Tensor, torch.Tensor, None]]:
    ...


def device_batches(batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
                   prepare: Callable[[torch.Tensor], torch.Tensor], dev: torch.device,
                   depth: int = PREFETCH
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Batches of (uint8 patches, labels, store rows or None) as (network inputs on ``dev``,
    labels on ``dev``, rows on the host), read ``depth`` batches ahead of the consumer by
    :func:`~histodistill.data.stream.prefetch`'s worker thread (``depth`` 0: no worker).
    ``prepare`` maps uint8 patches on ``dev`` to network inputs.

    On the CPU the worker also prepares the inputs, so a training step overlaps both the reading
    and the normalisation of the next batches; the tensors are those of preparing them in the
    consumer. On CUDA the worker puts patches and labels in pinned (page-locked) host memory;
    the consumer copies them with ``non_blocking=True``, so the copy overlaps the GPU's queued
    work, and prepares them on the GPU.
    """
    on_host, pin = dev.type == "cpu", dev.type == "cuda"

    def load(batch: tuple[np.ndarray, np.ndarray, np.ndarray | None]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        x, y, rows = batch
        xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y))
        rt = None if rows is None else torch.from_numpy(np.asarray(rows))
        if on_host:
            return prepare(xt), yt, rt
        return (xt.pin_memory(), yt.pin_memory(), rt) if pin else (xt, yt, rt)

    for xt, yt, rt in prefetch(map(load, batches), depth):
        if not on_host:
            xt = prepare(xt.to(dev, non_blocking=True))
            yt = yt.to(dev, non_blocking=True)
        yield xt, yt, rt


class RealData:
    """One split of a patch store (or the ``rows`` of it, e.g. one slide's) as normalised
    tensors on ``device``, drawn through a bounded class-balanced cache (``cache_mb``);
    :meth:`epoch` reads ``prefetch`` batches ahead (:func:`device_batches`)."""

    def __init__(self, store: PatchStore, split: str, cache_mb: float, seed: int,
                 device: torch.device, max_per_class: int = 0,
                 rows: np.ndarray | None = None, prefetch: int = PREFETCH) -> None:
        self.store, self.split, self.device, self.cache_mb = store, split, device, cache_mb
        self.prefetch = prefetch
        self.stats = Stats.from_store(store)
        self.sampler = ClassSampler(store, split, cache_mb, seed, max_per_class, rows=rows)

    @property
    def num_classes(self) -> int:
        return self.sampler.num_classes

    @property
    def im_size(self) -> int:
        return int(self.sampler.patch_shape[-1])

    @property
    def counts(self) -> list[int]:
        return [int(n) for n in self.sampler.counts]

    def _net(self, u8: np.ndarray) -> torch.Tensor:
        return self.stats.normalise(torch.from_numpy(np.ascontiguousarray(u8)).to(self.device))

    def batch(self, c: int, n: int) -> torch.Tensor:
        """``n`` random normalised patches of class ``c``."""
        return self._net(self.sampler.batch(c, n))

    def mixed(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` random normalised patches over all classes, and their labels."""
        x, y = self.sampler.mixed(n)
        return self._net(x), torch.from_numpy(y).to(self.device)

    def initial_rows(self, ipc: int | list[int], seed: int) -> np.ndarray:
        """``ipc`` seeded random store rows per class (or ``ipc[c]`` of class ``c``), class by
        class: the random coreset and the starting point of methods initialised from real
        patches."""
        counts = [ipc] * self.num_classes if isinstance(ipc, int) else list(ipc)
        return np.concatenate([self.sampler.first(c, k, seed) for c, k in enumerate(counts) if k]
                              or [np.empty(0, np.int64)])

    def pixels_of(self, rows: np.ndarray) -> torch.Tensor:
        """Store rows as float pixels in [0, 1] on the device."""
        return torch.from_numpy(self.sampler.rows(rows)).to(self.device).float().div_(255)

    def epoch(self, batch: int, seed: int | None, rows: np.ndarray | None = None
              ) -> Epoch[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One pass over the split (or ``rows``): normalised patches, labels and store rows,
        shuffled through a buffer of ``cache_mb`` when seeded, read ahead by a worker thread."""
        if rows is None and self.sampler.restricted:
            rows = self.sampler.selected_rows
        epoch = iterate(self.store, self.split, batch, seed, self.cache_mb, rows=rows)
        return Epoch(device_batches(epoch, self.stats.normalise, self.device, self.prefetch),
                     len(epoch))

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
