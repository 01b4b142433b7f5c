"""Peer tiler for bench/tiling.py: hs2p, run with the peers' own Python (.venv-peers, see
bench/peers.txt and `make bench-peers`); hs2p is no dependency of histodistill.

Reads one JSON request per line on stdin and answers one JSON line on stdout, so the bench can
interleave its runs with the tiler's while this interpreter and its imports stay warm. Each
request tiles one slide with hs2p's public API, ``hs2p.tile_slide``, then reads every kept
tile's pixels with ``hs2p.wsi.streaming.iter_tile_arrays_from_result`` into one reused buffer
(a fresh one per slide, capped as the tiler's is). Only that is timed: ``seconds`` (``tile_seconds`` of it the
segmentation and coordinates).

Request keys: path, spacing_um, tile_px, min_tissue, seg_method, seg_downsample, workers,
buffer_rows; optional: backend (hs2p's slide reader, default ``auto``) and base_spacing_um
(level 0's um/px, which hs2p otherwise reads from the file). The answer also gives
the kept tiles' level-0 corners (x, y).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import hs2p
import numpy as np
from hs2p import (FilterConfig, MaskSamplingConfig, SegmentationConfig, SlideSpec, TilingConfig,
                  tile_slide)
from hs2p.wsi.streaming import iter_tile_arrays_from_result


def run(req: dict) -> dict:
    tiling = TilingConfig(requested_spacing_um=float(req["spacing_um"]),
                          requested_tile_size_px=int(req["tile_px"]), tolerance=0.05, overlap=0.0,
                          backend=req.get("backend", "auto"))
    segmentation = SegmentationConfig(method=req["seg_method"],
                                      downsample=int(req["seg_downsample"]))
    # the shipped {background, tissue} vocabulary: binary tissue tiling at this coverage
    masks = MaskSamplingConfig(pixel_mapping={"background": 0, "tissue": 1},
                               min_coverage={"tissue": float(req["min_tissue"])})
    size = int(req["tile_px"])
    start = time.perf_counter()
    slide = SlideSpec(sample_id=Path(req["path"]).stem, image_path=Path(req["path"]),
                      spacing_at_level_0=req.get("base_spacing_um"))
    result = tile_slide(slide,
                        tiling=tiling, segmentation=segmentation, filtering=FilterConfig(),
                        masks=masks, num_workers=int(req["workers"]))
    tiled = time.perf_counter()
    # a fresh buffer per slide, capped as the tiler's (tiling.patch_buffer) is
    buffer = np.empty((max(1, min(int(req["buffer_rows"]), len(result.x))), size, size, 3), np.uint8)
    n = 0
    for tile in iter_tile_arrays_from_result(result=result, num_workers=int(req["workers"])):
        buffer[n % len(buffer)] = tile[..., :3]
        n += 1
    seconds = time.perf_counter() - start
    assert n == len(result.x), (n, len(result.x))
    return {"seconds": seconds, "tile_seconds": tiled - start, "patches": n,
            "backend": str(result.backend), "read_level": int(result.read_level),
            "seg_level": int(result.seg_level), "seg_spacing_um": float(result.seg_spacing_um),
            "x": result.x.tolist(), "y": result.y.tolist()}


def main() -> None:
    reply = os.fdopen(os.dup(1), "w")  # answers only: anything else printed goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        reply.write(json.dumps(run(json.loads(line)) | {"version": hs2p.__version__}) + "\n")
        reply.flush()


if __name__ == "__main__":
    main()
