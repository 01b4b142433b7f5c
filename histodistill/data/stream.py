"""Read patches from a zarr patch store in bounded batches, so memory does not grow with the cohort.

Only the small per-row metadata (``label``, ``split``) is ever loaded whole; pixels are read
by contiguous store chunk (one chunk decodes as a unit, so reading row by row would decode
the same chunk many times).

* :func:`channel_stats`: per-channel mean and std of a split, streamed.
* :func:`iterate`: one epoch over a split in batches, in store order or shuffled through a
  bounded shuffle buffer (training and prediction); an :class:`Epoch`, whose ``len`` is its
  batch count, so a training loop can project its duration after a few steps.
* :class:`ClassSampler`: class-balanced random batches for distillation, from the whole split
  when it fits in the cache budget, otherwise from a per-class reservoir refreshed with a few
  random store chunks after every draw.
* :func:`prefetch`: any of these streams read ahead by a worker thread (chunk decoding releases
  the GIL), so a training step overlaps the reading of the next batches.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Generator, Iterable, Iterator
from typing import Any, Generic, TypeVar

import numpy as np
import zarr

from histodistill.data.store import SPLITS, PatchStore, chunk_files

_MIB = 2**20
_T = TypeVar("_T")
# Batches the training loops' streams read ahead (prefetch depth): operational, the batches and
# so the results do not depend on it; each batch ahead holds one batch of memory.
PREFETCH = 2
_ITEM, _END, _ERROR = 0, 1, 2  # what the prefetch worker hands over
_ROW_BY_ROW = 16 * 1024  # patch bytes from which buffers are filled row by row (_copy_rows)
_SQUARES = (np.arange(256, dtype=np.uint16) ** 2).astype(np.uint16)


def _split_index(store: PatchStore, split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"{store.path}: unknown split {split!r}; expected one of {SPLITS}")
    return SPLITS.index(split)


def _chunk_groups(rows: np.ndarray, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    """Positions into sorted ``rows`` grouped by store chunk: (chunk index, positions)."""
    ids = rows // chunk
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(rows) else np.array([], int)
    ends = np.r_[starts[1:], len(rows)]
    for a, b in zip(starts, ends):
        yield int(ids[a]), np.arange(a, b)


def _read_sorted(arr: Any, rows: np.ndarray) -> np.ndarray:
    """Rows of one store chunk (sorted, repeats allowed): one contiguous read, then a selection."""
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    block = arr[lo:hi]
    return block if np.array_equal(rows, np.arange(lo, hi)) else block[rows - lo]


def _copy_rows(dst: np.ndarray, to: np.ndarray, src: np.ndarray, frm: np.ndarray) -> None:
    """``dst[to] = src[frm]`` (``dst`` may be ``src`` when ``to`` and ``frm`` are disjoint).
    Rows of at least ``_ROW_BY_ROW`` bytes are copied one by one: numpy would first gather
    ``src[frm]`` into a temporary, a second copy (and, for large patches, fresh pages) that
    costs more than a Python step per row."""
    if src.itemsize * int(np.prod(src.shape[1:])) < _ROW_BY_ROW:
        dst[to] = src[frm]
        return
    for t, f in zip(np.asarray(to).tolist(), np.asarray(frm).tolist()):
        dst[t] = src[f]


def read_rows(store: PatchStore, rows: np.ndarray) -> np.ndarray:
    """Patches (n, 3, H, W) uint8 of store ``rows`` in the given order (repeats allowed), read
    chunk by chunk so each touched chunk is decoded once."""
    arr = store.group["patches"]
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if len(rows) and (rows.min() < 0 or rows.max() >= arr.shape[0]):
        raise IndexError(f"{store.path}: rows outside [0, {arr.shape[0]})")
    out = np.empty((len(rows), *arr.shape[1:]), dtype=arr.dtype)
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    for _, group in _chunk_groups(ordered, arr.chunks[0]):
        out[order[group]] = _read_sorted(arr, ordered[group])
    return out


def prefetch(items: Iterable[_T], depth: int = PREFETCH) -> Generator[_T, None, None]:
    """``items`` in the same order, produced by a worker thread up to ``depth`` items ahead of
    the consumer, so that the consumer's work (a training step) overlaps the production of the
    next items (chunk reads: zarr's blosc decoding and numpy copies release the GIL).

    The items are exactly those of iterating ``items`` directly, in the same order: only where
    they are produced changes, so a seeded stream gives the same batches with or without it.
    An exception raised while producing an item is raised to the consumer, in the item's place.
    When the consumer stops early (``close()``, ``break`` out of a loop that drops the
    generator, or garbage collection) the worker stops before the next item, closes ``items``'s
    iterator and is joined. ``depth < 1`` iterates ``items`` in the caller's thread (no worker).

    Whatever ``items`` does runs in the worker: it must not share unsynchronised state (a random
    generator, a torch generator) with the consumer.
    """
    if depth < 1:
        yield from items
        return
    source = iter(items)
    ready: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
    slots = threading.Semaphore(depth)  # items produced and not yet taken by the consumer
    stop = threading.Event()

    def work() -> None:
        try:
            while True:
                slots.acquire()
                if stop.is_set():
                    return
                try:
                    item = next(source)
                except StopIteration:
                    ready.put((_END, None))
                    return
                except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                    ready.put((_ERROR, exc))
                    return
                ready.put((_ITEM, item))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=work, name="histodistill-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == _END:
                return
            if kind == _ERROR:
                raise value
            slots.release()
            yield value
    finally:
        stop.set()
        slots.release()  # wake a worker waiting for a slot, so that it sees ``stop``
        worker.join()


def channel_stats(store: PatchStore, split: str, chunk_rows: int = 4096
                  ) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of the split's pixels in [0, 1] units.

    Reads ``chunk_rows`` rows at a time (rounded to whole store chunks) and skips ranges with
    no row of the split; sums and sums of squares are accumulated exactly in integers.
    """
    arr = store.group["patches"]
    mask = store.array("split") == _split_index(store, split)
    n = int(mask.sum())
    if n == 0:
        raise ValueError(f"{store.path}: split {split!r} has no patches")
    chunk = arr.chunks[0]
    step = max(1, chunk_rows // chunk) * chunk
    channels = arr.shape[1]
    sums = np.zeros(channels, dtype=np.uint64)
    squares = np.zeros(channels, dtype=np.uint64)
    for a in range(0, arr.shape[0], step):
        keep = mask[a:a + step]
        if not keep.any():
            continue
        block = arr[a:a + len(keep)]
        if not keep.all():
            block = block[keep]
        for s in range(0, len(block), chunk):  # bound the uint16 squares to one chunk
            piece = block[s:s + chunk]
            sums += piece.sum(axis=(0, 2, 3), dtype=np.uint64)
            squares += _SQUARES[piece].sum(axis=(0, 2, 3), dtype=np.uint64)
    return _mean_std(sums, squares, n * int(np.prod(arr.shape[2:])))


def _mean_std(sums: np.ndarray, squares: np.ndarray, count: int
              ) -> tuple[list[float], list[float]]:
    """Mean and population std in [0, 1] units from exact per-channel sums of uint8 pixels and
    of their squares over ``count`` pixels each. The variance's numerator is a Python integer
    (beyond 64 bits for stores of more than a few thousand large patches): its square root is
    taken by :func:`math.sqrt`, which numpy cannot do for such an integer."""
    mean = [int(s) / count / 255 for s in sums]
    std = [math.sqrt(max(int(q) * count - int(s) ** 2, 0)) / count / 255
           for s, q in zip(sums, squares)]
    return mean, std


def record_channel_stats(path: str | os.PathLike) -> dict[str, list[float]]:
    """Compute the training split's channel statistics of the store at ``path`` and record them
    as attributes ``channel_mean`` and ``channel_std`` (called once when a store is built): the
    network input normalisation of every later stage. Also records its chunk files per array,
    which :class:`PatchStore` checks on every open."""
    mean, std = channel_stats(PatchStore(path), "train")
    stats = {"channel_mean": mean, "channel_std": std}
    zarr.open_group(str(path), mode="a").attrs.update({**stats, "chunk_files": chunk_files(path)})
    return stats


class Epoch(Generic[_T]):
    """One epoch of batches whose count is known before the first (``len``): a training loop
    projects its duration from its first steps (:class:`histodistill.runtime.Projection`)."""

    def __init__(self, batches: Iterable[_T], count: int) -> None:
        self.batches, self.count = batches, count

    def __iter__(self) -> Iterator[_T]:
        return iter(self.batches)

    def __len__(self) -> int:
        return self.count


def iterate(store: PatchStore, split: str, batch: int, seed: int | None, buffer_mb: float = 256,
            rows: np.ndarray | None = None
            ) -> "Epoch[tuple[np.ndarray, np.ndarray, np.ndarray]]":
    """One epoch over the split (or ``rows``, which must belong to it): batches of patches
    (uint8), labels (int64) and store rows (int64); every row is yielded exactly once.

    ``seed=None`` goes in store order. With a seed, store chunks are visited in a seeded random
    order and rows pass through a shuffle buffer of at most ``buffer_mb`` MiB of patches (at
    least one batch), so memory is bounded by the buffer plus one chunk whatever the split size.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    arr = store.group["patches"]
    labels = store.array("label")
    in_split = store.array("split") == _split_index(store, split)
    if rows is None:
        rows = np.flatnonzero(in_split)
    else:
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if len(rows) and (rows[0] < 0 or rows[-1] >= len(in_split) or not in_split[rows].all()):
            raise ValueError(f"{store.path}: some requested rows are not in split {split!r}")
    rows = rows.astype(np.int64)
    groups = list(_chunk_groups(rows, arr.chunks[0]))
    count = -(-len(rows) // batch)  # full batches, then the rest
    if seed is None:
        return Epoch(_ordered(arr, labels, rows, groups, batch), count)
    row_bytes = int(np.prod(arr.shape[1:]))
    capacity = min(len(rows), max(batch, int(buffer_mb * _MIB) // row_bytes))
    return Epoch(_shuffled(arr, labels, rows, groups, batch, capacity, np.random.default_rng(seed)),
                 count)


def _ordered(arr: Any, labels: np.ndarray, rows: np.ndarray,
             groups: list[tuple[int, np.ndarray]], batch: int
             ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    pending: list[np.ndarray] = []
    held = 0
    start = 0  # position in ``rows`` of the first pending patch
    for _, group in groups:
        pending.append(_read_sorted(arr, rows[group]))
        held += len(group)
        if held < batch:
            continue
        x = np.concatenate(pending)
        cut = held - held % batch
        for s in range(0, cut, batch):
            r = rows[start + s:start + s + batch]
            yield x[s:s + batch], labels[r], r
        pending, held, start = [x[cut:]], held - cut, start + cut
    if held:
        r = rows[start:]
        yield np.concatenate(pending), labels[r], r


def _shuffled(arr: Any, labels: np.ndarray, rows: np.ndarray,
              groups: list[tuple[int, np.ndarray]], batch: int, capacity: int,
              rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    buf = np.empty((capacity, *arr.shape[1:]), dtype=arr.dtype)
    buf_rows = np.empty(capacity, dtype=np.int64)
    m = 0
    for k in rng.permutation(len(groups)):
        r = rows[groups[k][1]]
        x = _read_sorted(arr, r)
        i = 0
        while i < len(r):
            take = min(capacity - m, len(r) - i)
            buf[m:m + take], buf_rows[m:m + take] = x[i:i + take], r[i:i + take]
            m, i = m + take, i + take
            if m == capacity >= batch:  # full: emit a random batch, close the holes with the tail
                pick = rng.choice(m, batch, replace=False)
                out, out_rows = buf[pick], buf_rows[pick]
                tail = m - batch
                holes = pick[pick < tail]
                fill = np.setdiff1d(np.arange(tail, m), pick, assume_unique=True)
                _copy_rows(buf, holes, buf, fill)
                buf_rows[holes] = buf_rows[fill]
                m = tail
                yield out, labels[out_rows], out_rows
    order = rng.permutation(m)
    for s in range(0, m, batch):
        pick = order[s:s + batch]
        yield buf[pick], labels[buf_rows[pick]], buf_rows[pick]


class ClassSampler:
    """Class-balanced random batches from one split of a patch store within a memory budget.

    If the split (after ``max_per_class``) fits in ``cache_mb`` MiB of uint8 patches it is
    loaded once and every class is sampled exactly uniformly. Otherwise each class keeps a
    reservoir of at most ``cache_mb / num_classes`` MiB, filled from random store chunks; after
    every draw ``refresh_chunks`` random chunks are decoded and their rows of this split replace
    random reservoir slots of their classes, so I/O per draw is a few chunks and memory is the
    budget plus one chunk while, over many draws, every row gets its turn.

    ``rows`` restricts the sampler to a subset of the split (e.g. one slide's rows, for per-slide
    distillation); a subset may lack classes (their count is 0 and drawing from them is an
    error), while the whole split must hold every class.
    """

    def __init__(self, store: PatchStore, split: str, cache_mb: float, seed: int,
                 max_per_class: int = 0, refresh_chunks: int = 1,
                 rows: np.ndarray | None = None) -> None:
        self.store, self.split, self.seed = store, split, seed
        self.max_per_class, self.refresh_chunks = max_per_class, refresh_chunks
        self.subset = rows is not None
        self._arr = store.group["patches"]
        self._chunk = int(self._arr.chunks[0])
        self.patch_shape: tuple[int, ...] = tuple(self._arr.shape[1:])
        self._row_bytes = int(np.prod(self.patch_shape))
        names = store.class_names
        self.num_classes = len(names)

        labels = store.array("label")
        in_split = store.array("split") == _split_index(store, split)
        if rows is None:
            rows = np.flatnonzero(in_split)
        else:
            rows = np.unique(np.asarray(rows, dtype=np.int64))
            if len(rows) == 0:
                raise ValueError(f"{store.path}: the requested subset of split {split!r} is empty")
            if rows[0] < 0 or rows[-1] >= len(in_split) or not in_split[rows].all():
                raise ValueError(f"{store.path}: some requested rows are not in split {split!r}")
        # A seeded subset per class when capped.
        subset = np.random.default_rng(seed)
        self._class_rows: list[np.ndarray] = []
        for c in range(self.num_classes):
            r = rows[labels[rows] == c].astype(np.int64)
            if len(r) == 0 and not self.subset:
                raise ValueError(f"{store.path}: class {names[c]!r} ({c}) has no patches in "
                                 f"split {split!r}")
            if max_per_class:
                r = np.sort(subset.permutation(r)[:max_per_class])
            self._class_rows.append(r)
        self.counts = np.array([len(r) for r in self._class_rows], dtype=np.int64)
        # All sampled rows, sorted, with their class: a chunk's rows are a searchsorted range.
        self._rows = np.concatenate(self._class_rows)
        order = np.argsort(self._rows)
        self._rows = self._rows[order]
        self._row_class = np.repeat(np.arange(self.num_classes), self.counts)[order]
        self._chunks = np.unique(self._rows // self._chunk)

        budget = int(cache_mb * _MIB)
        self.resident = int(self.counts.sum()) * self._row_bytes <= budget
        if self.resident:
            self._capacity = self.counts.copy()
        else:
            per_class = budget // self.num_classes // self._row_bytes
            if per_class < 1:
                need = self.num_classes * self._row_bytes / _MIB
                raise ValueError(f"{store.path}: cache_mb={cache_mb} holds less than one patch "
                                 f"per class; need at least {need:.3f}")
            self._capacity = np.minimum(self.counts, per_class)
        self._cache = [np.empty((int(k), *self.patch_shape), dtype=np.uint8)
                       for k in self._capacity]
        self._held = [np.empty(0, dtype=np.int64) for _ in range(self.num_classes)]
        self._rng = np.random.default_rng([seed, 1])
        if self.resident:
            self._load_all()
        else:
            self._fill()

    # ---- public ---------------------------------------------------------------------------
    @property
    def selected_rows(self) -> np.ndarray:
        """Every store row this sampler draws from (``rows`` and the ``max_per_class``
        subset), sorted."""
        return self._rows

    @property
    def restricted(self) -> bool:
        """Whether the sampler draws from less than the whole split."""
        return self.subset or bool(self.max_per_class)

    @property
    def cache_bytes(self) -> int:
        """Bytes of patch pixels currently held."""
        return sum(len(h) for h in self._held) * self._row_bytes

    def batch(self, c: int, n: int) -> np.ndarray:
        """``n`` random patches (n, 3, H, W) uint8 of class ``c``: without replacement when the
        class's cache holds at least ``n`` rows, with replacement otherwise."""
        self._check_class(c)
        out = self._draw(c, n)
        self._refresh()
        return out

    def balanced(self, per_class: int) -> tuple[np.ndarray, np.ndarray]:
        """A class-balanced batch: ``per_class`` random patches of every class, class after
        class, and their labels. Each class is drawn as :meth:`batch` draws it, straight into
        the batch (one copy per patch); the reservoir is refreshed once per batch, so when
        ``refresh_chunks`` store chunks hold ``num_classes * per_class`` rows every patch
        delivered costs one patch decoded."""
        for c in range(self.num_classes):
            self._check_class(c)
        out = np.empty((self.num_classes * per_class, *self.patch_shape), dtype=np.uint8)
        for c in range(self.num_classes):
            self._draw(c, per_class, out[c * per_class:(c + 1) * per_class])
        self._refresh()
        return out, np.repeat(np.arange(self.num_classes, dtype=np.int64), per_class)

    def mixed(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` patches whose classes are drawn in proportion to class sizes, and their labels."""
        labels = self._rng.choice(self.num_classes, n, p=self.counts / self.counts.sum())
        out = np.empty((n, *self.patch_shape), dtype=np.uint8)
        for c in range(self.num_classes):
            where = np.flatnonzero(labels == c)
            if len(where):
                out[where] = self._draw(c, len(where))
        self._refresh()
        return out, labels.astype(np.int64)

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """Patches of specific store rows, in the given order, read directly from the store."""
        return read_rows(self.store, rows)

    def first(self, c: int, k: int, seed: int) -> np.ndarray:
        """``k`` seeded random store rows of class ``c``, independent of the sampler's draws, so
        every method with the same seed starts from the same real patches."""
        self._check_class(c)
        r = self._class_rows[c]
        if len(r) < k:
            raise ValueError(f"{self.store.path}: class {self.store.class_names[c]!r} ({c}) has "
                             f"{len(r)} patches in split {self.split!r}, fewer than {k}")
        return np.random.default_rng([seed, c]).permutation(r)[:k]

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (RNG state and reservoir row ids, no pixels) to resume draws."""
        return {"split": self.split, "seed": self.seed, "max_per_class": self.max_per_class,
                "capacity": self._capacity.tolist(),
                "rng": self._rng.bit_generator.state,
                "reservoir": None if self.resident else [h.tolist() for h in self._held]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; reservoir pixels are re-read from the store."""
        mine = {k: v for k, v in self.state_dict().items() if k not in ("rng", "reservoir")}
        theirs = {k: state.get(k) for k in mine}
        if theirs != mine:
            raise ValueError(f"{self.store.path}: sampler state is for other settings: "
                             f"{theirs} != {mine}")
        if not self.resident:
            held = [np.asarray(h, dtype=np.int64) for h in state["reservoir"]]
            for c, h in enumerate(held):
                self._cache[c][:len(h)] = read_rows(self.store, h)
            self._held = held
        self._rng.bit_generator.state = state["rng"]

    # ---- internals ------------------------------------------------------------------------
    def _check_class(self, c: int) -> None:
        if not 0 <= c < self.num_classes:
            raise ValueError(f"{self.store.path}: class index {c} outside [0, {self.num_classes})")
        if self.counts[c] == 0:
            raise ValueError(f"{self.store.path}: class {self.store.class_names[c]!r} ({c}) has "
                             "no patches in the sampled rows")

    def _draw(self, c: int, n: int, out: np.ndarray | None = None) -> np.ndarray:
        """``n`` random cached patches of class ``c`` (into ``out`` when given)."""
        held = len(self._held[c])
        pick = self._rng.choice(held, n, replace=n > held)
        if out is None:
            return self._cache[c][pick]
        return np.take(self._cache[c], pick, axis=0, out=out, mode="clip")  # in range: unbuffered

    def _chunk_rows(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Sampled rows in store chunk ``k`` and their classes (metadata only, no I/O)."""
        a, b = np.searchsorted(self._rows, [k * self._chunk, (k + 1) * self._chunk])
        return self._rows[a:b], self._row_class[a:b]

    def _load_all(self) -> None:
        """Resident mode: every class's rows in store order, read chunk by chunk."""
        self._held = [r.copy() for r in self._class_rows]
        filled = np.zeros(self.num_classes, dtype=np.int64)
        for k in self._chunks:
            rows, classes = self._chunk_rows(int(k))
            block = _read_sorted(self._arr, rows)
            for c in np.unique(classes):
                x = block[classes == c]
                self._cache[c][filled[c]:filled[c] + len(x)] = x
                filled[c] += len(x)

    def _fill(self) -> None:
        """Reservoir mode: fill every class's reservoir from chunks visited in random order,
        skipping (without I/O) chunks with no row of a class that still needs rows."""
        held: list[list[np.ndarray]] = [[] for _ in range(self.num_classes)]
        need = self._capacity.copy()
        for k in self._rng.permutation(self._chunks):
            if not need.any():
                break
            rows, classes = self._chunk_rows(int(k))
            wanted = need[classes] > 0
            if not wanted.any():
                continue
            block = None
            for c in np.unique(classes[wanted]):
                pos = np.flatnonzero(classes == c)
                pos = self._rng.choice(pos, min(len(pos), int(need[c])), replace=False)
                pos.sort()
                if block is None:
                    block = _read_sorted(self._arr, rows)
                start = int(self._capacity[c] - need[c])
                self._cache[c][start:start + len(pos)] = block[pos]
                held[c].append(rows[pos])
                need[c] -= len(pos)
        self._held = [np.concatenate(h) if h else np.empty(0, np.int64) for h in held]

    def _refresh(self) -> None:
        """Replace random reservoir slots with rows of ``refresh_chunks`` random store chunks."""
        if self.resident:
            return
        for k in self._rng.choice(self._chunks, self.refresh_chunks):
            rows, classes = self._chunk_rows(int(k))
            block = None
            for c in np.unique(classes):
                pos = np.flatnonzero(classes == c)
                pos = pos[~np.isin(rows[pos], self._held[c])]
                if not len(pos):
                    continue
                m = min(len(pos), int(self._capacity[c]))
                pos = np.sort(self._rng.choice(pos, m, replace=False))
                slots = self._rng.choice(int(self._capacity[c]), m, replace=False)
                if block is None:
                    block = _read_sorted(self._arr, rows)
                _copy_rows(self._cache[c], slots, block, pos)
                self._held[c][slots] = rows[pos]
