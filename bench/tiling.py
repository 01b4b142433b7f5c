"""Tiling speed: the tiler against a naive loop, the slide's decode limit and a peer tiler (hs2p).

Usage: python bench/tiling.py [--repeats N] [--large-size W H] [--large-repeats N] [--smoke]
       [--peers-python PATH] [--hs2p-seg {otsu,hsv}] [--hs2p-backend {tifffile,openslide,auto}]

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
``tiling_vs_decode_limit_allcore`` (decode limit / tiler, where the limit,
``wsi.decode_tiles``, decodes exactly the JPEG tiles the kept patches need, on all cores,
nothing cut or stored; the mask, which the limit skips, is in the tiler's time) and
``read_phase_vs_decode_limit_allcore`` (decode limit / the tiler's reads alone).

Peer: hs2p (Apache-2.0; pinned in bench/peers.txt, installed by `make bench-peers` into
.venv-peers, never a dependency; skipped with a message when that venv is missing). It runs in a
subprocess of the peers' Python that stays warm across runs (bench/peers/hs2p_tiling.py) and
times itself around ``hs2p.tile_slide`` plus reading every kept tile's pixels into memory with
``hs2p.wsi.streaming.iter_tile_arrays_from_result`` (interpreter start and imports excluded),
interleaved with the tiler (plan and read on all cores, into memory, nothing stored), best of
``--large-repeats`` after one untimed warm-up run of hs2p. Same slides (the CMU crop and the large slide), same
output: 256 px patches at 20x, which hs2p asks as microns per pixel (the slide's own mpp at
20x: 0.499 and 0.5 um/px; tolerance 0.05, no overlap), on all cores (``num_workers``), with
its tifffile slide reader, given level 0's mpp as OpenSlide reads it (it misreads the SVS
crop's; ``--hs2p-backend``: its ``auto`` picks OpenSlide where cuCIM and VIPS are absent, about
half as fast on the large slide here). Tissue, matched as closely as the two semantics allow:
  ours - Otsu on HSV saturation of an 8 um/px thumbnail (floor 15, one opening, holes under
         (64 um)^2 filled); a patch is kept when >= 0.5 (``tissue_threshold``) of its mask
         pixels are tissue;
  hs2p - ``SegmentationConfig(method="otsu")``: Otsu on HSV saturation after a 7 px median
         blur and a 4 px closing (its defaults), on the pyramid level nearest downsample
         round(8 um / slide mpp) = 16 (level 3 of the large slide, 4 um/px; the single level of
         the CMU crop), then its contours (area filters a_t=4, a_h=2, its defaults); a tile is
         kept when >= 0.5 (``min_coverage["tissue"]``) of it lies inside them.
``--hs2p-seg hsv`` uses hs2p's default fixed HSV window instead. ``tiling_vs_hs2p`` is hs2p's
time / the tiler's (>1: the tiler is faster), ``tiling_patches_vs_hs2p`` the tiler's patch
count / hs2p's; their summaries take the lower slide. The counts differ by more than the masks:
hs2p starts its grid afresh at each tissue contour, the tiler has one grid for the whole slide;
the ``hs2p_<slide>`` lines also say how many of hs2p's tiles pass the tiler's tissue test.

``--smoke``: seconds, for tests: the CMU crop only, a 4,800 x 3,200 large slide in a temporary
folder, one repeat, the peer only if installed (no warm-up); figures go to results/bench/smoke/tiling.txt,
never over the real ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import numpy as np
import openslide

import tifffile

from histodistill import config
from histodistill.slides import tiling, wsi
from histodistill.io import atomic_path, save_figures
from histodistill.synth.cohort import DemoSpec, render_slide

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["normal", "tumor"]
HS2P_WORKER = ROOT / "bench/peers/hs2p_tiling.py"


def naive(path: Path, cfg: dict) -> int:
    slide = openslide.OpenSlide(str(path))
    geom = wsi.geometry(slide, path, cfg["magnification"], cfg["patch_size"], cfg["stride"])
    mask, down = wsi.tissue_mask(slide, path, geom.base_mpp, mask_mpp=cfg["mask_mpp"],
                                 max_size=cfg["mask_max_size"], min_saturation=cfg["min_saturation"],
                                 threads=int(cfg["threads"]))
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


def large_slide(width: int, height: int, folder: Path, levels: int = 4, tile: int = 256) -> Path:
    """A ``width`` x ``height`` pyramidal JPEG TIFF (0.5 mpp) tiled from demo-rendered blocks:
    a 10 x 10 mosaic of four rendered slides (two tumour), written tile by tile to ``folder``."""
    path = folder / f"large_{width}x{height}.tif"
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


class Hs2p:
    """hs2p tiling in one warm subprocess of the peers' Python (bench/peers/hs2p_tiling.py)."""

    def __init__(self, python: Path, segmentation: str, backend: str) -> None:
        self.segmentation, self.backend = segmentation, backend
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([str(python), str(HS2P_WORKER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)

    def tile(self, path: Path, cfg: dict, geom: wsi.SlideGeometry) -> dict[str, Any]:
        """Tile ``path`` as the tiler does with ``cfg``; hs2p's own timing, count and settings."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        request = {"path": str(path), "spacing_um": geom.base_mpp * geom.scale,
                   "tile_px": cfg["patch_size"], "min_tissue": cfg["tissue_threshold"],
                   "seg_method": self.segmentation,
                   "seg_downsample": max(1, round(cfg["mask_mpp"] / geom.base_mpp)),
                   "workers": int(cfg["threads"]), "backend": self.backend,
                   "base_spacing_um": geom.base_mpp,  # as OpenSlide reads it, for every reader
                   "buffer_rows": len(tiling.patch_buffer(cfg["patch_size"], 1 << 40))}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self.log.seek(0)
        raise RuntimeError(f"hs2p worker ended (exit {self.proc.wait()}):\n{self.log.read()[-3000:]}")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()
        self.log.close()


def start_hs2p(python: Path, segmentation: str, backend: str) -> Hs2p | None:
    if not python.exists():
        print(f"hs2p: skipped, no peers' Python at {python} (make bench-peers installs bench/peers.txt)")
        return None
    return Hs2p(python, segmentation, backend)


def versus_hs2p(name: str, path: Path, cfg: dict, peer: Hs2p, repeats: int, warm_up: bool = True
                ) -> tuple[float, float, str]:
    """Interleaved best of ``repeats``: hs2p's time / the tiler's, the tiler's patch count /
    hs2p's, and a line describing both."""
    coords, _, geom = tiling.plan_slide(path, "", "normal", 0, cfg, CLASSES, threads=int(cfg["threads"]))
    replies: list[dict[str, Any]] = [peer.tile(path, cfg, geom)] if warm_up else []  # untimed

    def hs2p() -> float:
        replies.append(peer.tile(path, cfg, geom))
        return replies[-1]["seconds"]

    t = best_of({"tiler": lambda: tiler(path, cfg), "hs2p": hs2p}, repeats, own_time={"hs2p"})
    got = replies[-1]
    with wsi.open_slide(path) as slide:  # how many of hs2p's tiles pass the tiler's own test
        mask, down = wsi.tissue_mask(slide, path, geom.base_mpp, mask_mpp=cfg["mask_mpp"],
                                     max_size=cfg["mask_max_size"],
                                     min_saturation=cfg["min_saturation"], threads=1)
    theirs = np.stack([got["x"], got["y"]], 1).reshape(-1, 2)
    passing = int((wsi.box_fraction(mask, down, theirs, geom.patch_size * geom.scale)
                   >= cfg["tissue_threshold"]).sum())
    line = (f"hs2p_{name}: {path.name}, {cfg['patch_size']} px at {cfg['magnification']}x "
            f"({geom.base_mpp * geom.scale:g} um/px), {cfg['threads']} threads, best of {repeats}: "
            f"hs2p {got['version']} {t['hs2p']:.2f} s (segmentation and coordinates "
            f"{min(r['tile_seconds'] for r in replies[-repeats:]):.2f} s; reader {got['backend']}, "
            f"level {got['read_level']}; {peer.segmentation} segmentation on level {got['seg_level']}"
            f", {got['seg_spacing_um']:g} um/px) {got['patches']} patches, {passing} of which pass "
            f"the tiler's tissue test (hs2p's grid starts at each contour, the tiler's is one "
            f"slide-wide grid); tiler {t['tiler']:.2f} s {len(coords)} patches (Otsu on saturation "
            f"at {cfg['mask_mpp']:g} um/px)")
    return t["hs2p"] / t["tiler"], len(coords) / max(1, got["patches"]), line


def large_case(base: dict, size: tuple[int, int], repeats: int, folder: Path) -> list[str]:
    """Time the naive loop, the tiler and the all-core decode limit on the large slide."""
    path = large_slide(*size, folder)
    cores = os.cpu_count() or 1
    cfg = base | {"magnification": 20, "patch_size": 256, "stride": 256, "threads": cores}
    coords, _, geom = tiling.plan_slide(path, "", "normal", 0, cfg, CLASSES, threads=int(cfg["threads"]))
    cpu: dict[str, float] = {}
    t = best_of({"naive": lambda: naive(path, cfg),
                 "tiler": lambda: tiler(path, cfg),
                 "plan": lambda: len(tiling.plan_slide(path, "", "normal", 0, cfg, CLASSES,
                                                       threads=int(cfg["threads"]))[0]),
                 "reads": lambda: sum(len(p) for _, p in tiling.read_chunks(path, coords, geom, cores)),
                 "decode": lambda: wsi.decode_tiles(path, coords, geom, threads=cores)}, repeats, cpu=cpu)
    n_tiles = wsi.decode_tiles(path, coords, geom, threads=cores)
    print(f"large: {path.name} level {geom.level}, 256 px at 20x, {len(coords)} patches from "
          f"{n_tiles} tiles, {cores} cores; best of {repeats}: naive {t['naive']:.2f} s, "
          f"tiler {t['tiler']:.2f} s (mask and plan {t['plan']:.2f} s, reads {t['reads']:.2f} s), "
          f"decode limit {t['decode']:.2f} s; least CPU time (all threads): tiler {cpu['tiler']:.2f} s "
          f"(mask and plan {cpu['plan']:.2f} s, reads {cpu['reads']:.2f} s), decode limit "
          f"{cpu['decode']:.2f} s")
    return [f"tiling_speedup_large: {t['naive'] / t['tiler']:.2f}",
            f"tiling_vs_decode_limit_allcore: {t['decode'] / t['tiler']:.2f}",
            f"read_phase_vs_decode_limit_allcore: {t['decode'] / t['reads']:.2f}"]


def tiler(path: Path, cfg: dict) -> int:
    """Plan, then read chunk by chunk into one buffer, as a tiling job does before storing."""
    coords, _, geom = tiling.plan_slide(path, "", "normal", 0, cfg, CLASSES, threads=int(cfg["threads"]))
    return sum(len(p) for _, p in tiling.read_chunks(path, coords, geom, int(cfg["threads"])))


def best_of(fns: dict[str, Callable[[], Any]], repeats: int, own_time: Collection[str] = (),
            cpu: dict[str, float] | None = None) -> dict[str, float]:
    """Best time of each function over ``repeats`` interleaved rounds; those in ``own_time``
    return their own time in seconds (measured inside a subprocess), the others are timed here.
    ``cpu`` gets the least CPU time (all threads of this process) of the others."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpus: dict[str, list[float]] = {k: [] for k in fns if k not in own_time}
    for _ in range(repeats):  # interleaved, so drifts in machine load hit all alike
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            out = fn()
            times[name].append(float(out) if name in own_time else time.perf_counter() - start)
            if name in cpus:
                cpus[name].append(time.process_time() - start_cpu)
    if cpu is not None:
        cpu.update({k: min(v) for k, v in cpus.items()})
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
    parser.add_argument("--large-repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true",
                        help="seconds: CMU crop only, a small large slide, one repeat (for tests)")
    parser.add_argument("--peers-python", type=Path, default=ROOT / ".venv-peers/bin/python",
                        help="Python with the peer tilers of bench/peers.txt (make bench-peers)")
    parser.add_argument("--hs2p-seg", choices=["otsu", "hsv"], default="otsu",
                        help="hs2p's tissue segmentation method")
    parser.add_argument("--hs2p-backend", choices=["tifffile", "openslide", "auto"], default="tifffile",
                        help="hs2p's slide reader (tifffile: the faster of the two installed here)")
    args = parser.parse_args()
    scratch = tempfile.TemporaryDirectory(prefix="bench-tiling-") if args.smoke else None
    if args.smoke:
        args.repeats = args.large_repeats = 1
        args.large_size = (4800, 3200)
    folder = Path(scratch.name) if scratch is not None else ROOT / "results/bench"
    out = ROOT / ("results/bench/smoke/tiling.txt" if args.smoke else "results/bench/tiling.txt")
    base = config.validate({"datasets": {}})["tiling"] | {"max_patches_per_slide": 0, "threads": 2}
    cases = {
        "cmu": (ROOT / "resources/real/cmu_small_region.svs",
                base | {"magnification": 20, "patch_size": 256, "stride": 256}),
    }
    if not args.smoke:
        cases["demo"] = (demo_slide(), base | {"magnification": 10, "patch_size": 64, "stride": 64})
    peer = start_hs2p(args.peers_python, args.hs2p_seg, args.hs2p_backend)
    try:
        speedups, vs_decode, read_speedups = {}, {}, {}
        for name, (path, cfg) in cases.items():
            coords, _, geom = tiling.plan_slide(path, "", "normal", 0, cfg, CLASSES, threads=int(cfg["threads"]))
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
        figures += large_case(base, tuple(args.large_size), args.large_repeats, folder)
        figures += [f"tiling_speedup: {min(speedups.values()):.2f}",
                    f"tiling_vs_decode_limit: {min(vs_decode.values()):.2f}"]
        if peer is not None:
            cores = os.cpu_count() or 1
            large = large_slide(*args.large_size, folder)
            peer_cases = {"cmu": (cases["cmu"][0], cases["cmu"][1] | {"threads": cores}),
                          "large": (large, base | {"magnification": 20, "patch_size": 256,
                                                   "stride": 256, "threads": cores})}
            faster, patches = {}, {}
            for name, (path, cfg) in peer_cases.items():
                faster[name], patches[name], line = versus_hs2p(name, path, cfg, peer,
                                                                args.large_repeats, not args.smoke)
                print(line)
            figures += [f"tiling_vs_hs2p_{name}: {faster[name]:.2f}" for name in peer_cases]
            figures += [f"tiling_patches_vs_hs2p_{name}: {patches[name]:.2f}" for name in peer_cases]
            figures += [f"tiling_vs_hs2p: {min(faster.values()):.2f}",
                        f"tiling_patches_vs_hs2p: {min(patches.values()):.2f}"]
    finally:
        if peer is not None:
            peer.close()
        if scratch is not None:
            scratch.cleanup()
    save_figures(figures, out)


if __name__ == "__main__":
    main()
