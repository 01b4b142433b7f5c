"""Tiling speed: the tiler against a naive loop and against the slide's decode limit.

Usage: python bench/tiling.py [--repeats N]

On the same slide and settings, in one run, interleaved, best of N:
  (a) naive  - the same Otsu mask and tissue check, then one OpenSlide ``read_region`` per kept
               patch at the level the tiler chose (plus the resize it needs);
  (b) decode - the decode limit: one ``read_region`` per internal tile of that level,
               tile-aligned, single thread, no processing;
  (c) tiler  - ``tiling.plan_slide`` + ``wsi.read_patches`` as the pipeline runs them.
(a) and (c) both include opening the slide and the Otsu mask; ``read_phase_speedup`` compares
the reads alone (same patches, no mask).
Slides: the real CMU SVS crop (240 px JPEG tiles, not aligned with 256 px patches) and one demo
slide (results/demo/..., built by `make demo`; rendered here if missing). Figures are speed
ratios, so >1 means the tiler is faster. Summary lines take the lower (worse) slide.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openslide

from histodistill import config, tiling, wsi
from histodistill.io import save_figures

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["normal", "tumor"]


def naive(path: Path, cfg: dict) -> int:
    slide = openslide.OpenSlide(str(path))
    geom = wsi.geometry(slide, path, cfg["magnification"], cfg["patch_size"], cfg["stride"])
    mask, down = wsi.tissue_mask(slide, path, geom.base_mpp, cfg["mask_mpp"], cfg["mask_max_size"],
                                 cfg["min_saturation"])
    coords = wsi.grid(*slide.dimensions, geom)
    keep = wsi.box_fraction(mask, down, coords, geom.patch_size * geom.scale) >= cfg["tissue_threshold"]
    for xy in coords[keep]:  # the same tissue check, then one read_region per patch
        wsi.read_patch(slide, xy, geom)
    slide.close()
    return int(keep.sum())


def naive_reads(path: Path, coords: np.ndarray, geom: wsi.SlideGeometry) -> int:
    slide = openslide.OpenSlide(str(path))
    for xy in coords:
        wsi.read_patch(slide, xy, geom)
    slide.close()
    return len(coords)


def decode_limit(path: Path, level: int) -> int:
    slide = openslide.OpenSlide(str(path))
    tiles = 0
    for x0, y0, w, h in wsi.iter_level_tiles(slide, level):
        slide.read_region((x0, y0), level, (w, h))
        tiles += 1
    slide.close()
    return tiles


def tiler(path: Path, cfg: dict) -> int:
    coords, _, geom = tiling.plan_slide(path, "", "normal", 0, cfg, CLASSES)
    return len(wsi.read_patches(path, coords, geom, threads=int(cfg["threads"])))


def best_of(fns: dict[str, Callable[[], int]], repeats: int) -> dict[str, float]:
    times = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved, so drifts in machine load hit all three alike
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: min(v) for k, v in times.items()}


def demo_slide() -> Path:
    path = ROOT / "results/demo/cohort/training/tumor/tumor_001.tif"
    if not path.exists():
        from histodistill.synth import DemoSpec, make_cohort

        path = make_cohort(ROOT / "results/bench/cohort", DemoSpec(), progress=False)
        path = path / "training/tumor/tumor_001.tif"
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    base = config.validate({"datasets": {}})["tiling"] | {"max_patches_per_slide": 0, "threads": 2}
    cases = {
        "cmu": (ROOT / "resources/real/cmu_small_region.svs",
                base | {"magnification": 20, "patch_size": 256, "stride": 256}),
        "demo": (demo_slide(), base | {"magnification": 10, "patch_size": 64, "stride": 64}),
    }
    speedups, vs_decode, read_speedups = {}, {}, {}
    for name, (path, cfg) in cases.items():
        coords, _, geom = tiling.plan_slide(path, "", "normal", 0, cfg, CLASSES)
        n_naive = naive(path, cfg)
        assert n_naive == len(coords), "naive loop and tiler must keep the same patches"
        t = best_of({"naive": lambda: naive(path, cfg),
                     "decode": lambda: decode_limit(path, geom.level),
                     "tiler": lambda: tiler(path, cfg),
                     "naive_reads": lambda: naive_reads(path, coords, geom),
                     "tiler_reads": lambda: len(wsi.read_patches(path, coords, geom, threads=2))},
                    args.repeats)
        speedups[name] = t["naive"] / t["tiler"]
        vs_decode[name] = t["decode"] / t["tiler"]
        read_speedups[name] = t["naive_reads"] / t["tiler_reads"]
        print(f"{name}: {path.name} level {geom.level} ({geom.vendor}), {cfg['patch_size']} px at "
              f"{cfg['magnification']}x, {len(coords)} patches, {decode_limit(path, geom.level)} "
              f"tiles; best of {args.repeats}: naive {t['naive'] * 1e3:.1f} ms, decode limit "
              f"{t['decode'] * 1e3:.1f} ms, tiler {t['tiler'] * 1e3:.1f} ms")
    figures = []
    for name in cases:
        figures += [f"tiling_speedup_{name}: {speedups[name]:.2f}",
                    f"tiling_vs_decode_limit_{name}: {vs_decode[name]:.2f}",
                    f"read_phase_speedup_{name}: {read_speedups[name]:.2f}"]
    figures += [f"tiling_speedup: {min(speedups.values()):.2f}",
                f"tiling_vs_decode_limit: {min(vs_decode.values()):.2f}"]
    save_figures(figures, ROOT / "results/bench/tiling.txt")


if __name__ == "__main__":
    main()
