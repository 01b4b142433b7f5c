"""Tiling speed: the tiler against a naive loop and against the slide's decode limit.

Usage: python bench/tiling.py [--repeats N] [--large-size W H] [--large-repeats N]

On the same slide and settings, in one run, interleaved, best of N:
  (a) naive  - the same Otsu mask and tissue check, then one OpenSlide ``read_region`` per kept
               patch at the level the tiler chose (plus the resize it needs);
  (b) decode - the decode limit: one ``read_region`` per internal tile of that level,
               tile-aligned, single thread, no processing;
  (c) tiler  - ``tiling.plan_slide`` + ``tiling.read_chunks`` as a tiling job runs them.
(a) and (c) both include opening the slide and the Otsu mask; ``read_phase_speedup`` compares
the reads alone (same patches, no mask).
Slides: the real CMU SVS crop (240 px JPEG tiles, not aligned with 256 px patches) and one demo
slide (results/demo/..., built by `make demo`; rendered here if missing). Figures are speed
ratios, so >1 means the tiler is faster. Summary lines take the lower (worse) slide.

Large slide (slide scale, where the naive loop's fixed costs no longer hide the ratio): a
40,000 x 30,000 px pyramidal JPEG TIFF at 20x, a mosaic of blocks rendered by the demo
generator, written once to results/bench/large_<W>x<H>.tif and reused. Tiled at 20x, 256 px,
on all cores: ``tiling_speedup_large`` (naive loop / tiler) and
``tiling_vs_decode_limit_allcore`` (decode limit / tiler, where the limit decodes exactly the
JPEG tiles the kept patches need, on all cores, nothing cut or stored).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openslide

import tifffile

from histodistill import config
from histodistill.slides import tiling, wsi
from histodistill.io import atomic_path, save_figures
from histodistill.synth.cohort import DemoSpec, render_slide

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


def decode_needed_tiles(path: Path, coords: np.ndarray, geom: wsi.SlideGeometry, threads: int) -> int:
    """Decode exactly the tiles the patches at ``coords`` touch, each once, in ``threads``
    threads; nothing is cut, resized or stored (the decode limit of the direct reader)."""
    level = wsi._TiffLevel.open(path, geom.vendor, geom.level_dims)
    lxy = np.round(coords / geom.level_downsample).astype(np.int64)
    need = set()
    for lx, ly in lxy:
        rows, cols = level.rows_cols(int(lx), int(ly), geom.read_size)
        need.update(ty * level.ntx + tx for ty in rows for tx in cols)
    todo = sorted(need)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for _ in pool.map(lambda ks: [level.tile(k) for k in ks], [todo[k::threads] for k in range(threads)]):
                pass
    finally:
        level.close()
    return len(todo)


def large_slide(width: int, height: int, levels: int = 4, tile: int = 256) -> Path:
    """A ``width`` x ``height`` pyramidal JPEG TIFF (0.5 mpp) tiled from demo-rendered blocks:
    a 10 x 10 mosaic of four rendered slides (two tumour), written tile by tile."""
    path = ROOT / f"results/bench/large_{width}x{height}.tif"
    if path.exists():
        return path
    bw, bh = width // 10, height // 10
    if bw % 2 ** (levels - 1) or bh % 2 ** (levels - 1):
        raise SystemExit(f"--large-size: W/10 and H/10 must be multiples of {2 ** (levels - 1)}")
    spec = DemoSpec.from_config({**config.defaults("demo"), "width": bw, "height": bh})
    pyramids = []
    for k in range(4):  # each block's own pyramid, so every level is the same mosaic
        img = render_slide(np.random.default_rng([7, k]), spec, k % 2 == 1, k + 1)[0]
        pyr = [img]
        for _ in range(1, levels):
            h, w = img.shape[0] // 2, img.shape[1] // 2
            img = img.reshape(h, 2, w, 2, 3).mean((1, 3)).astype(np.uint8)
            pyr.append(img)
        pyramids.append(pyr)

    def tiles(level: int):
        lw, lh, sw, sh = width >> level, height >> level, bw >> level, bh >> level
        for y0 in range(0, lh, tile):
            strip = np.zeros((tile, lw + tile, 3), np.uint8)  # padded to whole tiles
            for y in range(y0, min(y0 + tile, lh)):
                for c in range(10):
                    block = pyramids[((y // sh) * 10 + c) % 4][level]
                    strip[y - y0, c * sw:(c + 1) * sw] = block[y % sh]
            for x0 in range(0, lw, tile):
                yield strip[:, x0:x0 + tile]

    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for level in range(levels):
            res = 1e4 / (spec.mpp * 2 ** level)
            tif.write(tiles(level), shape=(height >> level, width >> level, 3), dtype=np.uint8,
                      tile=(tile, tile), photometric="rgb", compression="jpeg",
                      compressionargs={"level": spec.jpeg_quality}, resolution=(res, res),
                      resolutionunit="CENTIMETER", subfiletype=0 if level == 0 else 1)
    return path


def large_case(base: dict, size: tuple[int, int], repeats: int) -> list[str]:
    """Time the naive loop, the tiler and the all-core decode limit on the large slide."""
    path = large_slide(*size)
    cores = os.cpu_count() or 1
    cfg = base | {"magnification": 20, "patch_size": 256, "stride": 256, "threads": cores}
    coords, _, geom = tiling.plan_slide(path, "", "normal", 0, cfg, CLASSES)
    t = best_of({"naive": lambda: naive(path, cfg),
                 "tiler": lambda: tiler(path, cfg),
                 "plan": lambda: len(tiling.plan_slide(path, "", "normal", 0, cfg, CLASSES)[0]),
                 "decode": lambda: decode_needed_tiles(path, coords, geom, cores)}, repeats)
    n_tiles = decode_needed_tiles(path, coords, geom, cores)
    print(f"large: {path.name} level {geom.level}, 256 px at 20x, {len(coords)} patches from "
          f"{n_tiles} tiles, {cores} cores; best of {repeats}: naive {t['naive']:.2f} s, "
          f"tiler {t['tiler']:.2f} s (mask and plan {t['plan']:.2f} s), decode limit "
          f"{t['decode']:.2f} s")
    return [f"tiling_speedup_large: {t['naive'] / t['tiler']:.2f}",
            f"tiling_vs_decode_limit_allcore: {t['decode'] / t['tiler']:.2f}"]


def tiler(path: Path, cfg: dict) -> int:
    """Plan, then read chunk by chunk into one buffer, as a tiling job does before storing."""
    coords, _, geom = tiling.plan_slide(path, "", "normal", 0, cfg, CLASSES)
    return sum(len(p) for _, p in tiling.read_chunks(path, coords, geom, int(cfg["threads"])))


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
        from histodistill.synth.cohort import DemoSpec, make_cohort

        path = make_cohort(ROOT / "results/bench/cohort", DemoSpec.from_config(config.defaults("demo")),
                           progress=False)
        path = path / "training/tumor/tumor_001.tif"
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--large-size", type=int, nargs=2, default=(40000, 30000),
                        metavar=("W", "H"), help="level-0 size of the large slide")
    parser.add_argument("--large-repeats", type=int, default=3)
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
    figures += large_case(base, tuple(args.large_size), args.large_repeats)
    figures += [f"tiling_speedup: {min(speedups.values()):.2f}",
                f"tiling_vs_decode_limit: {min(vs_decode.values()):.2f}"]
    save_figures(figures, ROOT / "results/bench/tiling.txt")


if __name__ == "__main__":
    main()
