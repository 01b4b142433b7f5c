"""Streaming reads from a patch store: stats, epochs, the class-balanced sampler and the
prefetching worker."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from histodistill.data import stream
from histodistill.data.stream import (ClassSampler, _copy_rows, _mean_std, channel_stats, iterate,
                                      prefetch, read_rows)
from histodistill.data.store import SPLITS, PatchStore, StoreWriter

N, SIZE, CHUNK = 600, 8, 16
ROW_MB = 3 * SIZE * SIZE / 2**20


def write_store(path: Path, labels: np.ndarray, split: np.ndarray) -> PatchStore:
    """A store whose channels 0 and 1 encode the row id (row % 256, row // 256); channel 2 is
    seeded noise so the statistics are not trivial."""
    n = len(labels)
    rows = np.arange(n)
    x = np.empty((n, 3, SIZE, SIZE), dtype=np.uint8)
    x[:, 0] = (rows % 256)[:, None, None]
    x[:, 1] = (rows // 256)[:, None, None]
    x[:, 2] = np.random.default_rng(1).integers(0, 256, (n, SIZE, SIZE))
    writer = StoreWriter(path, SIZE, chunk=CHUNK, attrs={"class_names": ["a", "b", "c"]})
    for a in range(0, n, 100):  # several appends, as slides would be
        b = min(a + 100, n)
        writer.append(x[a:b], np.full((b - a, 2), -1), np.zeros(b - a), labels[a:b], split[a:b])
    return PatchStore(path)


def ids(x: np.ndarray) -> np.ndarray:
    """Store rows encoded in patches."""
    return x[:, 0, 0, 0].astype(np.int64) + 256 * x[:, 1, 0, 0].astype(np.int64)


@pytest.fixture(scope="module")
def skewed_store(tmp_path_factory: pytest.TempPathFactory) -> PatchStore:
    rng = np.random.default_rng(0)
    labels = rng.choice(3, N, p=[0.5, 0.3, 0.2])
    split = rng.choice(3, N, p=[0.6, 0.2, 0.2]).astype(np.int8)
    return write_store(tmp_path_factory.mktemp("stream") / "store.zarr", labels, split)


def meta(skewed_store: PatchStore) -> tuple[np.ndarray, np.ndarray]:
    return skewed_store.array("label"), skewed_store.array("split")


def test_read_rows_any_order(skewed_store):
    rows = np.array([599, 3, 17, 3, 250, 0])
    assert np.array_equal(ids(read_rows(skewed_store, rows)), rows)
    with pytest.raises(IndexError, match="store.zarr"):
        read_rows(skewed_store, np.array([N]))


@pytest.mark.parametrize("split", SPLITS)
def test_channel_stats_match_numpy(skewed_store, split):
    x = skewed_store.patches(skewed_store.indices(split)).astype(np.float64) / 255
    mean, std = channel_stats(skewed_store, split, chunk_rows=40)  # not a multiple of the chunk
    assert np.allclose(mean, x.mean(axis=(0, 2, 3)), atol=1e-12)
    assert np.allclose(std, x.std(axis=(0, 2, 3)), atol=1e-12)


def test_channel_stats_of_a_large_store_beyond_64_bits():
    """20,480 patches of 256 px: the variance's integer numerator exceeds 64 bits."""
    count = 20_480 * 256 * 256
    rng = np.random.default_rng(0)
    hist = rng.multinomial(count, np.full(256, 1 / 256), size=3)  # per-channel pixel counts
    values = np.arange(256, dtype=np.int64)
    sums, squares = (hist * values).sum(1).astype(np.uint64), (hist * values**2).sum(1).astype(np.uint64)
    mean, std = _mean_std(sums, squares, count)
    for c in range(3):
        m = (hist[c] * np.arange(256)).sum() / count
        v = (hist[c] * (np.arange(256) - m) ** 2).sum() / count
        assert mean[c] == pytest.approx(m / 255, rel=1e-12)
        assert std[c] == pytest.approx(np.sqrt(v) / 255, rel=1e-9)


@pytest.mark.parametrize("size", [8, 96])  # gathered by numpy, row by row
def test_copy_rows_is_a_gathered_assignment(size):
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (40, 3, size, size), dtype=np.uint8)
    to, frm = rng.permutation(40)[:15], rng.permutation(40)[:15]
    want = src.copy()
    want[to] = src[frm]
    got = src.copy()
    _copy_rows(got, to, src, frm)
    assert np.array_equal(got, want)
    holes, fill = np.array([3, 0, 7]), np.array([30, 38, 31])  # within one array, disjoint
    want[holes] = want[fill]
    _copy_rows(got, holes, got, fill)
    assert np.array_equal(got, want)


def test_row_by_row_copies_change_no_batch(skewed_store, monkeypatch):
    def draws() -> list[np.ndarray]:
        out = [t for b in iterate(skewed_store, "train", 16, seed=2, buffer_mb=40 * ROW_MB) for t in b]
        s = ClassSampler(skewed_store, "train", 30 * ROW_MB, seed=1)
        out += [s.balanced(5)[0] for _ in range(6)] + [s.batch(1, 4) for _ in range(4)]
        return out

    vectorised = draws()
    monkeypatch.setattr(stream, "_ROW_BY_ROW", 0)  # every row one by one
    row_by_row = draws()
    assert len(row_by_row) == len(vectorised)
    assert all(np.array_equal(a, b) for a, b in zip(row_by_row, vectorised))


def test_channel_stats_empty_split_names_store(tmp_path):
    small = write_store(tmp_path / "small.zarr", np.arange(30) % 3, np.zeros(30, np.int8))
    with pytest.raises(ValueError, match="small.zarr.*'val'"):
        channel_stats(small, "val")


@pytest.mark.parametrize("split", ["train", "test"])
def test_iterate_in_store_order(skewed_store, split):
    labels, _ = meta(skewed_store)
    batches = list(iterate(skewed_store, split, batch=37, seed=None))
    rows = np.concatenate([r for _, _, r in batches])
    assert np.array_equal(rows, skewed_store.indices(split))
    assert all(len(r) == 37 for _, _, r in batches[:-1]) and 0 < len(batches[-1][2]) <= 37
    for x, y, r in batches:
        assert x.dtype == np.uint8 and y.dtype == np.int64 and r.dtype == np.int64
        assert np.array_equal(ids(x), r) and np.array_equal(y, labels[r])


@pytest.mark.parametrize("buffer_rows", [40, 10_000])
def test_iterate_shuffled_visits_each_row_once(skewed_store, buffer_rows):
    labels, _ = meta(skewed_store)
    want = skewed_store.indices("train")

    def epoch(seed: int) -> np.ndarray:
        out = []
        for x, y, r in iterate(skewed_store, "train", batch=32, seed=seed, buffer_mb=buffer_rows * ROW_MB):
            assert len(r) <= 32 and np.array_equal(ids(x), r) and np.array_equal(y, labels[r])
            out.append(r)
        return np.concatenate(out)

    rows = epoch(5)
    assert len(rows) == len(want) and np.array_equal(np.sort(rows), want)
    assert not np.array_equal(rows, want)
    assert np.array_equal(epoch(5), rows) and not np.array_equal(epoch(6), rows)


def test_iterate_subset_and_foreign_rows(skewed_store):
    subset = skewed_store.indices("val")[::3]
    got = np.concatenate([r for _, _, r in iterate(skewed_store, "val", 8, seed=1, rows=subset)])
    assert np.array_equal(np.sort(got), subset)
    with pytest.raises(ValueError, match="not in split 'val'"):
        iterate(skewed_store, "val", 8, seed=None, rows=skewed_store.indices("train")[:3])


def test_sampler_resident_when_split_fits(skewed_store):
    labels, split = meta(skewed_store)
    train = skewed_store.indices("train")
    s = ClassSampler(skewed_store, "train", cache_mb=1, seed=0)
    assert s.resident and s.cache_bytes == len(train) * 3 * SIZE * SIZE
    assert s.num_classes == 3 and s.patch_shape == (3, SIZE, SIZE)
    assert np.array_equal(s.counts, np.bincount(labels[train], minlength=3))
    for c in range(3):
        r = ids(s.batch(c, 20))
        assert len(np.unique(r)) == 20  # without replacement
        assert (labels[r] == c).all() and (split[r] == 0).all()
    x, y = s.mixed(50)
    r = ids(x)
    assert np.array_equal(labels[r], y) and (split[r] == 0).all()
    a, b = (ClassSampler(skewed_store, "train", cache_mb=1, seed=0) for _ in range(2))
    assert all(np.array_equal(a.batch(c, 5), b.batch(c, 5)) for c in (0, 1, 2, 0))


@pytest.mark.parametrize("cache_rows", [30, 10_000])
def test_sampler_balanced_batches(skewed_store, cache_rows):
    labels, split = meta(skewed_store)
    a, b = (ClassSampler(skewed_store, "train", cache_rows * ROW_MB, seed=2) for _ in range(2))
    assert a.resident == (cache_rows == 10_000)
    held = [h.copy() for h in a._held]
    for _ in range(3):
        x, y = a.balanced(7)
        assert x.shape == (21, 3, SIZE, SIZE) and x.dtype == np.uint8 and y.dtype == np.int64
        assert np.array_equal(y, np.repeat([0, 1, 2], 7))
        assert np.array_equal(labels[ids(x)], y) and (split[ids(x)] == 0).all()
        assert all(len(np.unique(ids(x[y == c]))) == 7 for c in range(3))  # without replacement
        x2, y2 = b.balanced(7)
        assert np.array_equal(x, x2) and np.array_equal(y, y2)  # seeded
    assert a.resident or any(not np.array_equal(h, g) for h, g in zip(held, a._held))  # refreshed


def test_sampler_cap_keeps_a_seeded_subset_per_class(skewed_store):
    labels, split = meta(skewed_store)
    s = ClassSampler(skewed_store, "train", cache_mb=1, seed=3, max_per_class=20)
    rows = s.selected_rows
    assert (s.counts == 20).all() and (split[rows] == 0).all()
    assert np.array_equal(np.bincount(labels[rows]), [20, 20, 20])
    assert np.array_equal(np.sort(np.concatenate([s.first(c, 20, 0) for c in range(3)])), rows)
    other = ClassSampler(skewed_store, "train", cache_mb=1, seed=4, max_per_class=20).selected_rows
    assert not np.array_equal(rows, other)


def test_sampler_small_cache_stays_in_budget_and_refreshes(skewed_store):
    labels, split = meta(skewed_store)
    budget = 30 * ROW_MB  # 10 patches per class, far fewer than the split holds
    s = ClassSampler(skewed_store, "train", cache_mb=budget, seed=0)
    assert not s.resident
    seen: list[set[int]] = [set() for _ in range(3)]
    for i in range(300):
        c = i % 3
        r = ids(s.batch(c, 8))
        assert len(np.unique(r)) == 8
        assert (labels[r] == c).all() and (split[r] == 0).all()
        assert 0 < s.cache_bytes <= budget * 2**20
        seen[c].update(r.tolist())
    x, y = s.mixed(40)
    assert np.array_equal(labels[ids(x)], y)
    for c in range(3):
        assert len(seen[c]) >= 0.9 * s.counts[c], (c, len(seen[c]), s.counts[c])


def test_sampler_batch_larger_than_reservoir_uses_replacement(skewed_store):
    labels, _ = meta(skewed_store)
    s = ClassSampler(skewed_store, "train", cache_mb=30 * ROW_MB, seed=0)
    r = ids(s.batch(2, 25))
    assert len(r) == 25 and len(np.unique(r)) <= 10 and (labels[r] == 2).all()


@pytest.mark.parametrize("cache_rows", [30, 10_000])
def test_sampler_state_round_trip(skewed_store, cache_rows):
    def draws(s: ClassSampler) -> list[np.ndarray]:
        out = [s.batch(c, 6) for c in (0, 1, 2, 1)]
        return [*out, *s.mixed(12)]

    kwargs = {"split": "train", "cache_mb": cache_rows * ROW_MB, "seed": 4}
    a = ClassSampler(skewed_store, **kwargs)
    draws(a)
    state = json.loads(json.dumps(a.state_dict()))  # plain data, no pixels
    expected = draws(a)
    b = ClassSampler(skewed_store, **kwargs)
    b.load_state_dict(state)
    assert all(np.array_equal(p, q) for p, q in zip(draws(b), expected))
    other = ClassSampler(skewed_store, **{**kwargs, "seed": 5})
    with pytest.raises(ValueError, match="other settings"):
        other.load_state_dict(state)


def test_sampler_first_is_seeded_and_independent(skewed_store):
    labels, _ = meta(skewed_store)
    s = ClassSampler(skewed_store, "train", cache_mb=30 * ROW_MB, seed=0)
    rows = s.first(1, 5, seed=7)
    s.batch(1, 4)
    assert np.array_equal(s.first(1, 5, seed=7), rows)
    assert np.array_equal(ClassSampler(skewed_store, "train", 1, seed=9).first(1, 5, seed=7), rows)
    assert len(np.unique(rows)) == 5 and (labels[rows] == 1).all()
    assert np.array_equal(ids(s.rows(rows)), rows)
    with pytest.raises(ValueError, match="class 'c'"):
        s.first(2, int(s.counts[2]) + 1, seed=0)


def test_sampler_errors_name_class_and_store(tmp_path, skewed_store):
    labels = np.arange(60) % 3
    split = np.where(labels == 2, 2, 0).astype(np.int8)  # class 'c' only in test
    bad = write_store(tmp_path / "bad.zarr", labels, split)
    with pytest.raises(ValueError, match="bad.zarr.*class 'c'.*'train'"):
        ClassSampler(bad, "train", cache_mb=1, seed=0)
    with pytest.raises(ValueError, match="less than one patch per class"):
        ClassSampler(skewed_store, "train", cache_mb=ROW_MB, seed=0)


def test_iterate_a_split_smaller_than_one_batch(skewed_store):
    """A split of fewer rows than the batch comes out once, as one shuffled batch."""
    split = skewed_store.array("split")
    val = np.flatnonzero(split == SPLITS.index("val"))
    batches = list(iterate(skewed_store, "val", len(val) + 50, seed=3))
    assert len(batches) == 1 and sorted(batches[0][2].tolist()) == val.tolist()


# ---- prefetch -----------------------------------------------------------------------------------
def workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "histodistill-prefetch"]


class Source:
    """A stream of ``n`` items that counts what it produced and whether it was closed, and
    raises ``fail`` after ``fail_after`` items."""

    def __init__(self, n: int, fail_after: int | None = None) -> None:
        self.n, self.fail_after = n, fail_after
        self.produced, self.closed, self.thread = 0, False, ""

    def __iter__(self) -> Iterator[int]:
        self.thread = threading.current_thread().name
        try:
            for i in range(self.n):
                if i == self.fail_after:
                    raise ValueError(f"unreadable chunk at item {i}")
                self.produced += 1
                yield i
        finally:
            self.closed = True


@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("seed", [None, 4])
def test_prefetch_gives_the_same_batches_in_the_same_order(skewed_store, depth, seed):
    direct = list(iterate(skewed_store, "train", 24, seed, buffer_mb=40 * ROW_MB))
    ahead = list(prefetch(iterate(skewed_store, "train", 24, seed, buffer_mb=40 * ROW_MB), depth))
    assert len(ahead) == len(direct) > 5
    for a, b in zip(ahead, direct):
        assert all(u.dtype == v.dtype and np.array_equal(u, v) for u, v in zip(a, b))
    assert not workers()


def test_prefetch_reads_ahead_in_a_worker_up_to_depth():
    src = Source(100)
    stream = prefetch(src, depth=3)
    assert next(stream) == 0 and src.thread == "histodistill-prefetch"
    deadline = time.monotonic() + 10
    while src.produced < 4 and time.monotonic() < deadline:  # the consumer is busy: 3 ahead
        time.sleep(0.01)
    time.sleep(0.05)
    assert src.produced == 4
    assert list(stream) == list(range(1, 100))


def test_prefetch_raises_the_workers_error_in_the_consumer():
    src = Source(10, fail_after=4)
    got = []
    with pytest.raises(ValueError, match="unreadable chunk at item 4"):
        for item in prefetch(src, depth=2):
            got.append(item)
    assert got == [0, 1, 2, 3] and src.closed and not workers()


@pytest.mark.parametrize("stop", ["close", "break"])
def test_prefetch_stops_its_worker_when_the_consumer_stops_early(stop):
    src = Source(10_000)
    stream = prefetch(src, depth=2)
    for item in stream:
        if item == 5:
            break
    if stop == "close":
        stream.close()
    else:
        del stream  # dropping the generator closes it
    assert not workers() and src.closed
    assert src.produced <= 6 + 2  # what was taken, plus at most depth read ahead
    unstarted = Source(5)
    prefetch(unstarted, depth=2).close()  # a stream never read starts no worker
    assert unstarted.produced == 0 and not workers()


@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
@pytest.mark.parametrize("seed", [None, 3])
def test_an_epoch_knows_its_batch_count_before_the_first(skewed_store, batch, seed):
    """len() of an epoch is the number of batches it then yields (a loop projects its duration
    from it), in store order and shuffled, with a buffer smaller than the split, and on rows."""
    for rows in (None, skewed_store.indices("train")[::5]):
        epoch = iterate(skewed_store, "train", batch, seed, buffer_mb=0.01, rows=rows)
        assert len(epoch) == len(list(epoch))


@pytest.mark.parametrize("array", ["patches", "label"])
def test_a_finished_store_missing_a_chunk_file_is_refused_not_read_as_zeros(tmp_path, array):
    """zarr reads a deleted chunk as its fill value: black patches, class-0 labels."""
    import shutil

    from conftest import make_toy_store
    from histodistill.data.store import PatchStore
    from histodistill.io import InputError

    store = make_toy_store(tmp_path / "p.zarr")
    assert len(PatchStore(store)) == 64  # intact: opens
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    chunk = next(f for f in sorted((copy / array).rglob("*")) if f.is_file() and f.name != "zarr.json")
    chunk.unlink()
    with pytest.raises(InputError, match=rf"^\[store\] .*copy.zarr: chunk files differ from those "
                                         rf"recorded when it was built \(\{{'{array}': '\d+ of \d+'\}}\)"):
        PatchStore(copy)
