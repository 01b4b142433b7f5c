"""Whole-slide images: opening, magnification, Otsu tissue mask, patch grid and fast tile reading.

Coordinates are level-0 pixels ``(x, y)`` of a patch's top-left corner, as OpenSlide uses them.
A patch of ``patch_size`` pixels at magnification ``m`` covers ``patch_size * base_mag / m``
level-0 pixels; it is read from the coarsest pyramid level that is still at least as fine as
``m`` and resized to ``patch_size``.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes

from histodistill.io import InputError

STAGE = "tile"


@dataclass(frozen=True)
class SlideGeometry:
    """What the tiler needs to know about one slide at one target magnification."""

    base_mpp: float  # microns per level-0 pixel
    base_mag: float  # objective magnification of level 0
    scale: float  # level-0 pixels per output pixel at the target magnification
    level: int  # pyramid level read
    level_downsample: float  # that level's downsample
    read_size: int  # pixels read at ``level`` for one patch (then resized to patch_size)
    patch_size: int
    stride: int


def open_slide(path: str | os.PathLike, stage: str = STAGE) -> openslide.OpenSlide:
    """Open a slide with OpenSlide, or raise :class:`InputError` naming the file and stage."""
    path = Path(path)
    if not path.is_file():
        raise InputError(stage, path, "slide file does not exist")
    try:
        slide = openslide.OpenSlide(str(path))
        slide.read_region((0, 0), slide.level_count - 1, (1, 1))  # fail now, not mid-tiling
    except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError, OSError) as err:
        raise InputError(stage, path, f"cannot be read by OpenSlide ({err})") from err
    return slide


def base_resolution(
    slide: openslide.OpenSlide, path: str | os.PathLike, default_mpp: float | None = None
) -> tuple[float, float]:
    """Return ``(mpp, magnification)`` of level 0.

    Objective power is used when the slide records it; otherwise magnification is derived from
    mpp with the usual convention ``mag = 10 / mpp`` (generic TIFF records no objective power).
    """
    props = slide.properties
    mpp = _float(props.get(openslide.PROPERTY_NAME_MPP_X))
    mag = _float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
    if mpp is None and mag is None:
        if default_mpp is None:
            raise InputError(
                STAGE, path,
                "slide records neither mpp nor objective power; set tiling.default_mpp in config",
            )
        mpp = default_mpp
    if mag is None:
        mag = 10.0 / mpp
    if mpp is None:
        mpp = 10.0 / mag
    return mpp, mag


def _float(value: str | None) -> float | None:
    try:
        out = float(value) if value is not None else None
    except ValueError:
        return None
    return out if out and out > 0 else None


def geometry(
    slide: openslide.OpenSlide,
    path: str | os.PathLike,
    magnification: float,
    patch_size: int,
    stride: int,
    default_mpp: float | None = None,
) -> SlideGeometry:
    """Pick the pyramid level and read size for patches at ``magnification``."""
    mpp, mag = base_resolution(slide, path, default_mpp)
    scale = mag / magnification
    if scale < 1 - 1e-3:
        raise InputError(
            STAGE, path, f"target magnification {magnification}x exceeds the slide's {mag:g}x"
        )
    downs = slide.level_downsamples
    level = max(i for i, d in enumerate(downs) if d <= scale * (1 + 1e-3))
    read = int(round(patch_size * scale / downs[level]))
    return SlideGeometry(mpp, mag, scale, level, downs[level], read, patch_size, stride)


def tissue_mask(
    slide: openslide.OpenSlide, mpp: float, mask_mpp: float = 8.0, max_size: int = 2048,
    min_saturation: float = 15.0,
) -> tuple[np.ndarray, tuple[float, float]]:
    """Otsu tissue mask on the saturation of a low-magnification thumbnail.

    The thumbnail has ``mask_mpp`` microns per pixel (8 um is about 1.25x), where nuclei and
    stroma blend and Otsu separates tissue from glass, capped at ``max_size`` pixels. The Otsu
    threshold is floored at ``min_saturation`` (0-255), so a blank slide gives an empty mask
    instead of a threshold through background noise. Returns the boolean mask and its
    downsample ``(dx, dy)`` relative to level 0.
    """
    w0, h0 = slide.dimensions
    side = int(np.clip(max(w0, h0) * mpp / mask_mpp, 32, max_size))
    thumb = np.asarray(slide.get_thumbnail((side, side)).convert("RGB"))
    sat = np.asarray(Image.fromarray(thumb).convert("HSV"))[..., 1]
    sat = ndimage.median_filter(sat, size=5)
    if sat.max() < min_saturation:
        mask = np.zeros(sat.shape, bool)
    else:
        mask = sat > max(float(threshold_otsu(sat)), min_saturation)
        mask = ndimage.binary_opening(mask, iterations=1)
        # fill holes smaller than ~(64 um)^2 (nuclei-free specks), keep real lumens and tears
        mask = remove_small_holes(mask, max_size=max(1, int((64 / mask_mpp) ** 2)))
    return mask, (w0 / mask.shape[1], h0 / mask.shape[0])


def grid(width0: int, height0: int, geom: SlideGeometry) -> np.ndarray:
    """All patch top-left corners (N, 2) in level-0 pixels that fit inside the slide."""
    size0 = geom.patch_size * geom.scale
    step0 = geom.stride * geom.scale
    nx = int(math.floor((width0 - size0) / step0 + 1e-6)) + 1 if width0 >= size0 else 0
    ny = int(math.floor((height0 - size0) / step0 + 1e-6)) + 1 if height0 >= size0 else 0
    ys, xs = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    return np.stack([np.round(xs.ravel() * step0), np.round(ys.ravel() * step0)], 1).astype(np.int64)


def box_fraction(
    mask: np.ndarray, down: tuple[float, float], coords: np.ndarray, size0: float
) -> np.ndarray:
    """Fraction of mask pixels, among those whose centres lie inside each patch box, that are set.

    ``coords`` are level-0 corners, ``size0`` the patch side in level-0 pixels. Uses an integral
    image, so it costs O(N) whatever the patch size.
    """
    dx, dy = down
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    integral[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    # pixel j lies inside [x, x + size0) when x <= (j + 0.5) dx < x + size0
    j0 = np.clip(np.ceil(coords[:, 0] / dx - 0.5), 0, mask.shape[1]).astype(np.int64)
    j1 = np.clip(np.ceil((coords[:, 0] + size0) / dx - 0.5), 0, mask.shape[1]).astype(np.int64)
    i0 = np.clip(np.ceil(coords[:, 1] / dy - 0.5), 0, mask.shape[0]).astype(np.int64)
    i1 = np.clip(np.ceil((coords[:, 1] + size0) / dy - 0.5), 0, mask.shape[0]).astype(np.int64)
    inside = integral[i1, j1] - integral[i0, j1] - integral[i1, j0] + integral[i0, j0]
    area = (i1 - i0) * (j1 - j0)
    return np.where(area > 0, inside / np.maximum(area, 1), 0.0)


def read_patch(slide: openslide.OpenSlide, xy: tuple[int, int], geom: SlideGeometry) -> np.ndarray:
    """Read one patch as (H, W, 3) uint8 with a single ``read_region`` (the naive way)."""
    region = slide.read_region((int(xy[0]), int(xy[1])), geom.level, (geom.read_size,) * 2)
    rgb = np.asarray(region.convert("RGB"))
    return _resize(rgb, geom.patch_size)


def _resize(rgb: np.ndarray, size: int) -> np.ndarray:
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BOX))


def _tile_size(slide: openslide.OpenSlide, level: int) -> int:
    props = slide.properties
    width = _float(props.get(f"openslide.level[{level}].tile-width"))
    return int(width) if width else 256


def _blocks(coords: np.ndarray, geom: SlideGeometry, tile: int, block: int) -> list[np.ndarray]:
    """Group patch indices into rectangular blocks of roughly ``block`` level pixels.

    Blocks follow the pyramid's internal tile grid, so each tile is decoded about once, and
    only blocks holding patches are read (background is never decoded).
    """
    cell = max(tile, (block // tile) * tile) * geom.level_downsample  # block side in level 0
    keys = (coords[:, 1] // cell) * (1 << 31) + coords[:, 0] // cell
    order = np.argsort(keys, kind="stable")
    _, starts = np.unique(keys[order], return_index=True)
    return np.split(order, starts[1:])


def read_patches(
    slide_path: str | os.PathLike,
    coords: np.ndarray,
    geom: SlideGeometry,
    threads: int = 2,
    block: int = 2048,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Read the patches at ``coords`` as (N, H, W, 3) uint8, fast.

    Patches are grouped into tile-aligned blocks; each block is one ``read_region`` in a worker
    thread (ctypes releases the GIL while OpenSlide decodes), then patches are sliced out and
    resized. Each thread keeps its own OpenSlide handle.
    """
    out = np.empty((len(coords), geom.patch_size, geom.patch_size, 3), np.uint8)
    if len(coords) == 0:
        return out
    local = threading.local()
    opened: list[openslide.OpenSlide] = []
    r, ds = geom.read_size, geom.level_downsample

    def work(idx: np.ndarray) -> int:
        if not hasattr(local, "slide"):
            local.slide = openslide.OpenSlide(str(slide_path))
            opened.append(local.slide)
        x0, y0 = coords[idx, 0].min(), coords[idx, 1].min()
        lx = np.round((coords[idx, 0] - x0) / ds).astype(int)
        ly = np.round((coords[idx, 1] - y0) / ds).astype(int)
        size = (int(lx.max()) + r, int(ly.max()) + r)
        region = np.asarray(local.slide.read_region((int(x0), int(y0)), geom.level, size))
        for k, i in enumerate(idx):
            out[i] = _resize(np.ascontiguousarray(region[ly[k]:ly[k] + r, lx[k]:lx[k] + r, :3]),
                             geom.patch_size)
        return len(idx)

    with openslide.OpenSlide(str(slide_path)) as probe:
        tile = _tile_size(probe, geom.level)
    try:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for n in pool.map(work, _blocks(coords, geom, tile, block)):
                if progress is not None:
                    progress(n)
    finally:
        for handle in opened:
            handle.close()
    return out


def iter_level_tiles(slide: openslide.OpenSlide, level: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(x0, y0, w, h)`` of each internal tile of ``level`` (level-0 origin, level size)."""
    tile = _tile_size(slide, level)
    width, height = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    for ty in range(0, height, tile):
        for tx in range(0, width, tile):
            yield (int(round(tx * ds)), int(round(ty * ds)), min(tile, width - tx),
                   min(tile, height - ty))
