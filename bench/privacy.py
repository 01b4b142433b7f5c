"""Privacy audit cost: the audit must scale linearly with the training split, in time and not at
all in memory (the nearest-neighbour search is batched matrix products with running minima over
the streamed split, never a Python loop over patches nor the whole split in memory).

Usage: python bench/privacy.py [--small 1000] [--large 4000] [--repeats 2] [--smoke]

Builds two stores of real H&E patches (32 px crops of the shipped 1000x1000 target image at
random positions and orientations, two classes by darkness): ``small`` and ``large`` training
patches per class, the same 500 held-out test patches per class in both. A supervised encoder
(the demo profile's ConvNet) is trained once on the small store. Each store is audited (20
synthetic images, pixel and feature space, 1,000 bootstrap resamples) in a fresh process, best
of ``repeats``: ``audit_s_<n>`` is the audit's wall time, ``audit_scaling`` large over small
(4.0 is linear; the goal is <= 5) and ``audit_peak_rss_ratio`` the child's peak resident set,
large over small (1.0: flat).

``--smoke``: a check that the bench still runs (the test suite's), in seconds: 16 and 64
training and 8 held-out patches per class, one repeat, one thread, the audits run in this
process (not a fresh one: their peak memory then means nothing); figures go to
results/bench/smoke/privacy.txt.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZE = 32
HELD_OUT = 500  # per class

from _child import child_result  # noqa: E402  (bench/_child.py, beside this script)
from histodistill import config  # noqa: E402

ENCODER = {**config.defaults("$defs/encoder"), "kind": "supervised", "net": "convnet", "seed": 0,
           "net_kwargs": {"width": 32, "norm": "batchnorm"},
           "train": {**config.defaults("$defs/train"), "epochs": 1, "lr": 0.01, "batch": 256},
           "augment": {**config.defaults("$defs/augment"), "preset": "none"}}


def crops(n: int, seed: int) -> np.ndarray:
    """``n`` random 32 px crops (N, 3, 32, 32) uint8 of the real H&E target image, each in one
    of the 8 orientations."""
    from PIL import Image

    image = np.asarray(Image.open(ROOT / "resources/real/target_image.png").convert("RGB"))
    rng = np.random.default_rng(seed)
    ys = rng.integers(0, image.shape[0] - SIZE, n)
    xs = rng.integers(0, image.shape[1] - SIZE, n)
    out = np.stack([image[y:y + SIZE, x:x + SIZE] for y, x in zip(ys, xs)])
    out = np.stack([np.rot90(p, k % 4) if k < 4 else np.rot90(p[::-1], k % 4)
                    for p, k in zip(out, rng.integers(0, 8, n))])
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def make_store(path: Path, per_class: int, held_out: int = HELD_OUT) -> Path:
    """``per_class`` training and ``held_out`` test patches per class (darker or paler than the
    image's median crop), the test patches the same whatever ``per_class``."""
    from histodistill.data.stream import record_channel_stats
    from histodistill.data.store import SPLITS, StoreWriter

    def labelled(x: np.ndarray) -> np.ndarray:
        return (x.reshape(len(x), -1).mean(1) < 160).astype(np.int64)

    writer = StoreWriter(path, SIZE, attrs={"class_names": ["pale", "dark"], "slides": [],
                                            "split_names": list(SPLITS), "patch_size": SIZE})
    for split, n, seed in (("train", per_class, 1), ("test", held_out, 2)):
        x = crops(4 * n, seed)  # enough to fill both classes
        y = labelled(x)
        keep = np.concatenate([np.flatnonzero(y == c)[:n] for c in (0, 1)])
        for s in range(0, len(keep), 2048):
            k = keep[s:s + 2048]
            writer.append(x[k], np.full((len(k), 2), -1), np.full(len(k), -1), y[k],
                          np.full(len(k), SPLITS.index(split)))
    record_channel_stats(path)
    return path


def child(store: str, encoder: str, synthetic: str, held_out: int = HELD_OUT, threads: int = 2) -> None:
    """Audit once in this (fresh) process; print its wall time and peak RSS."""
    import torch

    from histodistill.privacy.audit import AuditConfig, audit

    torch.set_num_threads(threads)
    settings = AuditConfig.from_config({**config.defaults("privacy"), "samples": 2 * held_out})
    section, _ = audit(synthetic, store, encoder, settings)
    print(json.dumps({"seconds": section["seconds"],
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(store: Path, encoder: Path, synthetic: Path, held_out: int = HELD_OUT,
            threads: int = 2, fresh: bool = True) -> dict[str, float]:
    """The audit's seconds and peak RSS, in a fresh process (in this one when not ``fresh``)."""
    argv = ["--child", str(store), str(encoder), str(synthetic), "--held-out", str(held_out),
            "--threads", str(threads)]
    return child_result(__file__, main, argv, fresh)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--held-out", type=int, default=HELD_OUT, help="test patches per class")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: check the bench runs")
    parser.add_argument("--child", nargs=3)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child, held_out=args.held_out, threads=args.threads)
        return
    out = ROOT / "results" / "bench" / "privacy.txt"
    if args.smoke:
        args.small, args.large, args.repeats, args.held_out, args.threads = 16, 64, 1, 8, 1
        out = ROOT / "results" / "bench" / "smoke" / "privacy.txt"
    import torch
    import zarr

    from histodistill.encoders import train_encoder
    from histodistill.io import save_figures

    if args.smoke:
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stores = {n: make_store(work / f"s{n}.zarr", n, args.held_out) for n in (args.small, args.large)}
        encoder = work / "supervised.pt"
        train_encoder(stores[args.small], encoder, ENCODER, cache_mb=64)
        synthetic = work / "syn.zarr"
        group = zarr.open_group(str(synthetic), mode="w")
        group.create_array("images", data=crops(20, 3))
        group.create_array("labels", data=np.repeat([0, 1], 10))
        runs = {n: [] for n in stores}
        for _ in range(args.repeats):  # interleaved: load drifts hit both sizes alike
            for n, store in stores.items():
                runs[n].append(measure(store, encoder, synthetic, args.held_out, args.threads,
                                       fresh=not args.smoke))
    best = {n: min(r["seconds"] for r in rs) for n, rs in runs.items()}
    rss = {n: min(r["peak_rss_mb"] for r in rs) for n, rs in runs.items()}
    save_figures([*(f"audit_s_{n}: {best[n]:.2f}" for n in best),
                  *(f"audit_peak_rss_mb_{n}: {rss[n]:.0f}" for n in rss),
                  f"audit_peak_rss_ratio: {rss[args.large] / rss[args.small]:.3f}",
                  f"audit_scaling: {best[args.large] / best[args.small]:.2f}"], out)


if __name__ == "__main__":
    main()
