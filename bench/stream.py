"""Streaming speed: class-balanced batches from a large patch store against raw chunk decoding,
and training steps fed by the stream against training steps on preloaded tensors.

Usage: python bench/stream.py [--n 20480] [--repeats 3] [--train-repeats 7] [--steps 24] [--smoke]

Store: ``--n`` (>= 20,000) 256 px uint8 patches of four tissue classes in equal numbers, in
random class order, all in the training split, written with the library's ``StoreWriter`` (the
project's store format: 64-row chunks, blosc zstd with bit shuffle) and its channel statistics,
once, to results/bench/stream_<N>x<size>.zarr, then reused. Each patch is a random crop, flip
and rotation of one of a few 512 px fields rendered by the patch demo's tissue renderer
(``histodistill.synth.patches``), so it compresses like an H&E tile (about 75 %).

Reading (one thread; the page cache warmed first), in one run, interleaved, best of --repeats:
  (a) stream - N / 256 class-balanced batches of 256 (64 per class, ``ClassSampler.balanced``)
               in the sampler's streaming regime: a reservoir of ``cache_mb`` (a quarter of the
               store, 1024 MiB at most) refreshed after every batch with four random store
               chunks (256 rows), so every delivered patch costs one decoded patch;
  (b) raw    - the same number of patches decoded from the same store: every chunk once, in a
               seeded random order, read whole by zarr straight into numpy (no sampling, no
               copies);
  (e) epoch  - one shuffled training epoch of the store (``iterate``, the training loops'
               stream, through its 256 MiB shuffle buffer): exactly the patches of (b).
``stream_patches_per_s_per_core`` is (a)'s patches per second over the cores it kept busy (its
process CPU time, every thread, over its wall time), i.e. patches per CPU second, which on a
shared machine does not depend on the share of a core the run got; ``stream_vs_raw`` is (a)'s
rate per core over (b)'s (goal >= 0.8), ``epoch_vs_raw`` (e)'s over (b)'s. Best of --repeats:
the run with the least CPU time.

Training (one torch thread, so the prefetching worker has a core of its own): the project's
ConvNet at 256 px, as small as it goes (width 2, depth 3, no norm layers) so that loading a
batch weighs as much as a CPU allows against a step, batch 32, trained by
``histodistill.training.train`` on --steps batches of the streamed training split
(``Inputs.split_batches``: shuffled, normalised, read ahead by the worker thread) against the
very same batches preloaded as tensors, and against the stream without the worker (prefetch
0); interleaved, --train-repeats times, each ratio the median over repeats of the ratio within
a repeat (paired: one fast or slow run on a shared VM does not decide it, as a best-of would;
the preloaded step alone varied by a third between repeats here). A step's
time is the time from one batch to the next, as the loop sees it (so it includes any wait for
the batch), over the steps after the first two (the first fills the shuffle buffer).
``train_step_ratio`` is the streamed step over the preloaded one (goal <= 1.05);
``train_step_ratio_no_prefetch`` the same without the worker; ``load_vs_step`` what loading and
preparing a batch costs the single thread over a preloaded step. Overlap needs a core for the
worker: where every core is busy (other jobs), the worker's thread takes its turns from the
training thread. The ``..._unqueued`` ratios leave out the time the training thread was ready
to run but queued for a core (Linux's per-thread schedstat; waits for a batch, for the GIL and
the slowing of shared memory bandwidth stay in): the ratios a machine with a spare core for the
worker would see.

``--smoke``: a 512-patch store of 64 px in results/bench/smoke/ (figures there too), one repeat,
a few steps: seconds, to check that the bench runs; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's library, whatever is installed

import torch  # noqa: E402

from histodistill import config, models  # noqa: E402
from histodistill.data.store import PatchStore, StoreWriter  # noqa: E402
from histodistill.data.stream import PREFETCH, ClassSampler, iterate, record_channel_stats  # noqa: E402
from histodistill.io import save_figures  # noqa: E402
from histodistill.synth.patches import PatchDemoSpec, render_patch  # noqa: E402
from histodistill.training import Inputs, TrainConfig, train  # noqa: E402

CLASSES = ("debris", "lymphocytes", "stroma", "tumour")
CHUNK = 64  # rows per store chunk (the StoreWriter's default)
BATCH = 256  # class-balanced batch: 64 patches of each class
FIELDS = 8  # rendered fields per class, each cut into many patches
TRAIN = config.defaults("$defs/train")


def build_store(path: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` patches of ``size`` px, classes in equal numbers and random order, all training
    rows, written once (to ``<path>.partial``, renamed when complete)."""
    if path.exists():
        return path
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    start = time.perf_counter()
    spec = PatchDemoSpec(1, 1, 1, 0.45, seed, size=2 * size, render=2 * size,
                         field_um=size * 1.0)  # 0.5 um per px
    bank = np.stack([np.stack([render_patch(np.random.default_rng([seed, c, i]), spec, name, i % 2)
                               for i in range(FIELDS)]) for c, name in enumerate(CLASSES)])
    rng = np.random.default_rng([seed, 1])
    labels = rng.permutation(np.arange(n) % len(CLASSES))
    writer = StoreWriter(partial, size, chunk=CHUNK,
                         attrs={"class_names": list(CLASSES), "split_names": ["train", "val", "test"],
                                "slides": [], "patch_size": size, "bench": "bench/stream.py"})
    step = 16 * CHUNK
    for a in range(0, n, step):
        y = labels[a:a + step]
        x = np.empty((len(y), 3, size, size), np.uint8)
        field = rng.integers(0, FIELDS, len(y))
        oy, ox = rng.integers(0, size + 1, (2, len(y)))
        turn = rng.integers(0, 8, len(y))
        for i in range(len(y)):
            p = bank[y[i], field[i], oy[i]:oy[i] + size, ox[i]:ox[i] + size]
            p = np.rot90(p, turn[i] % 4)
            x[i] = (p[:, ::-1] if turn[i] >= 4 else p).transpose(2, 0, 1)
        writer.append(x, np.full((len(y), 2), -1), np.full(len(y), -1), y,
                      np.zeros(len(y), np.int8))
    record_channel_stats(partial)
    partial.rename(path)
    print(f"built {path.relative_to(ROOT)}: {n} patches of {size} px in "
          f"{time.perf_counter() - start:.0f} s")
    return path


def timed(work: Callable[[], int]) -> tuple[float, float, int]:
    """Wall seconds, process CPU seconds and the patches ``work`` returned."""
    wall, cpu = time.perf_counter(), time.process_time()
    n = work()
    return time.perf_counter() - wall, time.process_time() - cpu, n


def raw(arr: Any, order: np.ndarray) -> int:
    """Decode store chunks ``order`` straight into numpy."""
    n = 0
    for k in order:
        n += len(arr[k * CHUNK:(k + 1) * CHUNK])
    return n


def balanced(sampler: ClassSampler, batches: int, per_class: int) -> int:
    """``batches`` class-balanced batches of ``per_class`` patches of every class."""
    return sum(len(sampler.balanced(per_class)[1]) for _ in range(batches))


def epoch(store: PatchStore, batch: int, seed: int) -> int:
    return sum(len(x) for x, _, _ in iterate(store, "train", batch, seed, 256))


def reading(store: PatchStore, repeats: int) -> dict[str, Any]:
    arr = store.group["patches"]
    n, chunks = len(store), -(-len(store) // CHUNK)
    store_mib = n * int(np.prod(arr.shape[1:])) / 2**20
    cache_mb = min(1024.0, store_mib / 4)
    batch = BATCH
    batches = n // batch
    # a batch's refresh decodes as many patches as it delivers
    sampler = ClassSampler(store, "train", cache_mb, seed=0, refresh_chunks=batch // CHUNK)
    assert not sampler.resident
    raw(arr, np.arange(chunks))  # warm the page cache: every reader decodes from memory
    best: dict[str, tuple[float, float, int]] = {}
    for rep in range(repeats):
        order = np.random.default_rng([2, rep]).permutation(chunks)
        runs = {"raw": lambda: raw(arr, order),
                "stream": lambda: balanced(sampler, batches, batch // len(CLASSES)),
                "epoch": lambda: epoch(store, batch, rep)}
        for name, work in runs.items():
            wall, cpu, patches = timed(work)
            print(f"  {name}: {patches} patches in {wall:.2f} s ({patches / wall:.0f}/s wall, "
                  f"{cpu / wall:.2f} cores busy, {patches / cpu:.0f}/s per core)")
            if name not in best or cpu < best[name][1]:
                best[name] = (wall, cpu, patches)
    per_core = {k: p / cpu for k, (_, cpu, p) in best.items()}
    wall_rate = {k: p / wall for k, (wall, _, p) in best.items()}
    return {"n": n, "store_mib": store_mib, "cache_mb": cache_mb, "per_core": per_core,
            "wall_rate": wall_rate, "cores": best["stream"][1] / best["stream"][0]}


def queued_s() -> float:
    """Seconds this thread has spent ready to run but waiting for a core (Linux schedstat;
    0 where the kernel does not report it)."""
    try:
        path = f"/proc/self/task/{threading.get_native_id()}/schedstat"
        return int(Path(path).read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def stamped(batches: Iterable[Any], stamps: list[tuple[float, float]]) -> Iterator[Any]:
    """``batches``, noting when the loop got each one (and when it asked past the last), with
    the loop's thread's time queued for a core so far."""
    for b in batches:
        stamps.append((time.perf_counter(), queued_s()))
        yield b
    stamps.append((time.perf_counter(), queued_s()))


def per_step(stamps: list[tuple[float, float]], warm: int) -> tuple[float, float]:
    """Seconds per step after the first ``warm``: wall, and wall less the time queued."""
    steps = len(stamps) - 1 - warm
    wall = (stamps[-1][0] - stamps[warm][0]) / steps
    return wall, wall - (stamps[-1][1] - stamps[warm][1]) / steps


def training(store: PatchStore, repeats: int, steps: int, batch: int, width: int) -> dict[str, float]:
    cpu = torch.device("cpu")
    size = int(store.attrs["patch_size"])
    cfg = TrainConfig.from_config({**TRAIN, "epochs": 1, "batch": batch, "schedule": "constant"})
    feeds = {"prefetch": Inputs(store, None, False, cpu, 256, prefetch=PREFETCH),
             "inline": Inputs(store, None, False, cpu, 256, prefetch=0)}
    seed, warm = 7, 2
    # the very batches the stream gives, preloaded as network inputs
    preloaded = list(islice(feeds["inline"].split_batches("train", batch, seed)(0), steps))
    torch.manual_seed(0)
    net0 = models.build("convnet", len(CLASSES), size, width=width, depth=3, norm="none")
    nets = {k: copy.deepcopy(net0) for k in ("preloaded", *feeds)}
    modes: dict[str, Callable[[int], Iterable[Any]]] = {
        "preloaded": lambda e: iter(preloaded),
        **{k: (lambda e, f=f: islice(f.split_batches("train", batch, seed)(0), steps))
           for k, f in feeds.items()}}
    runs: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
    for _ in range(repeats):
        for mode, batches in modes.items():
            stamps: list[tuple[float, float]] = []
            train(nets[mode], lambda e, b=batches, s=stamps: stamped(b(e), s), cfg,
                  torch.Generator().manual_seed(0))
            wall, own = per_step(stamps, warm)
            print(f"  {mode}: {wall * 1e3:.0f} ms per step (batch {batch}), "
                  f"{own * 1e3:.0f} ms not queued for a core")
            runs[mode].append((wall, own))
    # loading and preparing a batch alone (the stream's own steps, on the same single thread)
    stamps = []
    for _ in stamped(islice(feeds["inline"].split_batches("train", batch, seed)(0), steps), stamps):
        pass
    load = per_step(stamps, warm)[1]
    def paired(mode: str, k: int) -> float:
        """The median over repeats of ``mode``'s step over the preloaded step of the same repeat
        (paired: a drift of the machine between repeats cancels)."""
        return statistics.median(m[k] / p[k] for m, p in zip(runs[mode], runs["preloaded"]))

    step = statistics.median(w for w, _ in runs["preloaded"])
    own = statistics.median(o for _, o in runs["preloaded"])
    return {"ratio": paired("prefetch", 0), "ratio_inline": paired("inline", 0),
            "ratio_own": paired("prefetch", 1), "ratio_inline_own": paired("inline", 1),
            "step_ms": step * 1e3, "load_vs_step": load / own}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20480, help="patches in the store (>= 20,000)")
    parser.add_argument("--size", type=int, default=256, help="patch size (px)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=24, help="training steps timed per mode")
    parser.add_argument("--batch", type=int, default=32, help="training batch")
    parser.add_argument("--width", type=int, default=2, help="ConvNet width")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny store and run in results/bench/smoke/ (seconds)")
    args = parser.parse_args()
    out = ROOT / "results/bench"
    if args.smoke:
        out = out / "smoke"
        args.n, args.size, args.steps, args.batch = 512, 64, 5, 16
        args.repeats = args.train_repeats = 1
    torch.set_num_threads(1)
    store = PatchStore(build_store(out / f"stream_{args.n}x{args.size}.zarr", args.n, args.size))
    print(f"reading: {len(store)} patches of {args.size} px, "
          f"{os.cpu_count()} cores on the machine")
    read = reading(store, args.repeats)
    print(f"  store {read['store_mib']:.0f} MiB of pixels, sampler reservoir "
          f"{read['cache_mb']:.0f} MiB")
    print(f"training: ConvNet width {args.width} at {args.size} px, batch {args.batch}, "
          f"{args.steps} steps, prefetch depth {PREFETCH}, one torch thread")
    tr = training(store, args.train_repeats, args.steps, args.batch, args.width)
    rate = read["per_core"]
    save_figures([
        f"stream_patches_per_s: {read['wall_rate']['stream']:.0f}",
        f"stream_cores: {read['cores']:.2f}",
        f"stream_patches_per_s_per_core: {rate['stream']:.0f}",
        f"raw_patches_per_s_per_core: {rate['raw']:.0f}",
        f"stream_vs_raw: {rate['stream'] / rate['raw']:.3f}",
        f"epoch_vs_raw: {rate['epoch'] / rate['raw']:.3f}",
        f"train_step_ms: {tr['step_ms']:.0f}",
        f"load_vs_step: {tr['load_vs_step']:.3f}",
        f"train_step_ratio_no_prefetch: {tr['ratio_inline']:.3f}",
        f"train_step_ratio: {tr['ratio']:.3f}",
        f"train_step_ratio_no_prefetch_unqueued: {tr['ratio_inline_own']:.3f}",
        f"train_step_ratio_unqueued: {tr['ratio_own']:.3f}",
    ], out / "stream.txt")


if __name__ == "__main__":
    main()
