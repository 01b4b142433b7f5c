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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
import tifffile
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
    vendor: str = ""  # OpenSlide vendor: picks the direct tile reader where it applies
    level_dims: tuple[int, int] = (0, 0)  # size of ``level`` in its own pixels


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
        assert mpp is not None  # recorded, or the default: both missing was refused above
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
    vendor = slide.properties.get(openslide.PROPERTY_NAME_VENDOR, "")
    width, height = slide.level_dimensions[level]
    return SlideGeometry(mpp, mag, scale, level, downs[level], read, patch_size, stride, vendor,
                         (width, height))


def tissue_mask(
    slide: openslide.OpenSlide, path: str | os.PathLike, mpp: float, *, mask_mpp: float,
    max_size: int, min_saturation: float, threads: int,
) -> tuple[np.ndarray, tuple[float, float]]:
    """Otsu tissue mask on the saturation of a low-magnification thumbnail.

    The thumbnail has ``mask_mpp`` microns per pixel (8 um is about 1.25x), where nuclei and
    stroma blend and Otsu separates tissue from glass, capped at ``max_size`` pixels. The Otsu
    threshold is floored at ``min_saturation`` (0-255), so a blank slide gives an empty mask
    instead of a threshold through background noise. Returns the boolean mask and its
    downsample ``(dx, dy)`` relative to level 0. ``threads`` decode the thumbnail's level.
    """
    w0, h0 = slide.dimensions
    side = int(np.clip(max(w0, h0) * mpp / mask_mpp, 32, max_size))
    thumb = thumbnail(slide, path, side, threads=threads)
    # the BOX-averaged thumbnail is already smooth; opening below removes isolated specks
    sat = np.asarray(Image.fromarray(thumb).convert("HSV").getchannel("S"))
    if sat.max() < min_saturation:
        mask: np.ndarray = np.zeros(sat.shape, bool)  # 2-D (numpy's stub infers a 0-d shape)
    else:
        mask = sat > max(float(threshold_otsu(sat)), min_saturation)
        mask = ndimage.binary_opening(mask, iterations=1)
        # fill holes smaller than ~(64 um)^2 (nuclei-free specks), keep real lumens and tears
        mask = remove_small_holes(mask, max_size=max(1, int((64 / mask_mpp) ** 2)))
    return mask, (w0 / mask.shape[1], h0 / mask.shape[0])


def thumbnail(slide: openslide.OpenSlide, path: str | os.PathLike, side: int, *, threads: int
              ) -> np.ndarray:
    """RGB image of the whole slide whose longest side is ``side`` pixels, cheaply.

    Uses the coarsest pyramid level that is at least that large; when even that level is over
    four times larger and the file embeds a thumbnail of the same aspect ratio (Aperio SVS
    does), that thumbnail is used instead. Tiled TIFF levels are decoded directly, in
    ``threads`` threads.
    """
    w0, h0 = slide.dimensions
    scale = side / max(w0, h0)
    size = (max(1, round(w0 * scale)), max(1, round(h0 * scale)))
    level = max([i for i, (w, h) in enumerate(slide.level_dimensions) if max(w, h) >= side],
                default=0)
    lw, lh = slide.level_dimensions[level]
    thumb = slide.associated_images.get("thumbnail")
    if (max(lw, lh) > 4 * side and thumb is not None and max(thumb.size) >= side
            and abs(thumb.size[0] / thumb.size[1] - w0 / h0) < 0.01 * w0 / h0):
        image = thumb.convert("RGB")
    else:
        vendor = slide.properties.get(openslide.PROPERTY_NAME_VENDOR, "")
        tiff = _TiffLevel.open(path, vendor, level, (lw, lh))
        if tiff is None:
            image = read_region(slide, path, (0, 0), level, (lw, lh)).convert("RGB")
        else:
            try:
                image = Image.fromarray(tiff.whole(threads=threads))
            finally:
                tiff.close()
    return np.asarray(image.resize(size, Image.Resampling.BOX))


def grid(width0: int, height0: int, geom: SlideGeometry) -> np.ndarray:
    """All patch top-left corners (N, 2) in level-0 pixels that fit inside the slide.

    Corners are snapped to whole pixels of the pyramid level that is read, so no patch needs
    sub-pixel resampling.
    """
    size0 = geom.patch_size * geom.scale
    step0 = geom.stride * geom.scale
    nx = int(math.floor((width0 - size0) / step0 + 1e-6)) + 1 if width0 >= size0 else 0
    ny = int(math.floor((height0 - size0) / step0 + 1e-6)) + 1 if height0 >= size0 else 0
    ys, xs = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    ds = geom.level_downsample  # corners fall on whole pixels of the level that is read
    corners = np.round(np.stack([xs.ravel(), ys.ravel()], 1) * step0 / ds) * ds
    return np.floor(corners + 1e-6).astype(np.int64)


def box_fraction(
    mask: np.ndarray, down: tuple[float, float], coords: np.ndarray, size0: float
) -> np.ndarray:
    """Fraction of mask pixels, among those whose centres lie inside each patch box, that are set.

    ``coords`` are level-0 corners, ``size0`` the patch side in level-0 pixels. Uses an integral
    image, so it costs O(N) whatever the patch size.
    """
    dx, dy = down
    count = np.int32 if mask.size < 2**31 else np.int64  # exact either way; int32 is faster
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), count)
    np.cumsum(mask, 0, dtype=count, out=integral[1:, 1:])
    np.cumsum(integral[1:, 1:], 1, out=integral[1:, 1:])
    # pixel j lies inside [x, x + size0) when x <= (j + 0.5) dx < x + size0
    j0 = np.clip(np.ceil(coords[:, 0] / dx - 0.5), 0, mask.shape[1]).astype(np.int64)
    j1 = np.clip(np.ceil((coords[:, 0] + size0) / dx - 0.5), 0, mask.shape[1]).astype(np.int64)
    i0 = np.clip(np.ceil(coords[:, 1] / dy - 0.5), 0, mask.shape[0]).astype(np.int64)
    i1 = np.clip(np.ceil((coords[:, 1] + size0) / dy - 0.5), 0, mask.shape[0]).astype(np.int64)
    inside = integral[i1, j1] - integral[i0, j1] - integral[i1, j0] + integral[i0, j0]
    area = (i1 - i0) * (j1 - j0)
    return np.where(area > 0, inside / np.maximum(area, 1), 0.0)


def read_region(slide: openslide.OpenSlide, path: str | os.PathLike, xy: tuple[int, int],
                level: int, size: tuple[int, int]) -> Image.Image:
    """OpenSlide's ``read_region``, with undecodable pixel data (corrupt JPEG inside a readable
    file) reported as one :class:`InputError` naming the slide, level and region."""
    try:
        return slide.read_region(xy, level, size)
    except openslide.OpenSlideError as err:
        raise InputError(STAGE, path, f"pixel data cannot be decoded at level {level}, region "
                         f"x {xy[0]}, y {xy[1]} (level-0), {size[0]} x {size[1]} level pixels "
                         f"({err})") from None


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
    width = _float(slide.properties.get(f"openslide.level[{level}].tile-width"))
    return int(width) if width else 256


class _TiffLevel:
    """Direct access to the tiles of one tiled TIFF page that is a pyramid level.

    Reads raw tile bytes with ``os.pread`` (thread-safe) and decodes them with tifffile's
    imagecodecs decoders, which release the GIL: several times cheaper than OpenSlide's
    ``read_region`` (ARGB compositing, premultiplied-alpha conversion, PIL copies).
    """

    VENDORS = ("generic-tiff", "aperio")  # plain tile grids; other formats go through OpenSlide

    def __init__(self, path: str | os.PathLike, page: tifffile.TiffPage, level: int) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.path, self.page, self.level = path, page, level
        self.tw, self.th = page.tilewidth, page.tilelength
        self.width, self.height = page.imagewidth, page.imagelength
        self.ntx = -(-self.width // self.tw)
        self.offsets, self.counts = page.dataoffsets, page.databytecounts

    @classmethod
    def open(cls, path: str | os.PathLike, vendor: str, level: int, dims: tuple[int, int]
             ) -> "_TiffLevel | None":
        """The TIFF page of pyramid ``level`` (size ``dims``) when it is a plain 8-bit RGB tile
        grid."""
        if vendor not in cls.VENDORS:
            return None
        width, height = dims
        try:
            with tifffile.TiffFile(path) as tif:
                for page in tif.pages:
                    assert isinstance(page, tifffile.TiffPage)  # frames only when asked for (useframes)
                    if (page.is_tiled and (page.imagewidth, page.imagelength) == (width, height)
                            and page.samplesperpixel == 3 and page.bitspersample == 8
                            and page.tiledepth == 1 and page.planarconfig == 1):
                        _ = page.decode  # build the decoder while the file is open
                        return cls(path, page, level)
        except (tifffile.TiffFileError, ValueError, KeyError):
            return None
        return None

    def close(self) -> None:
        os.close(self.fd)

    def tile(self, index: int) -> np.ndarray:
        """Decode tile ``index`` (row-major) as (th, tw, 3) uint8."""
        if self.counts[index] == 0:  # sparse tile: OpenSlide paints it transparent, i.e. black
            return np.zeros((self.th, self.tw, 3), np.uint8)
        data = os.pread(self.fd, self.counts[index], self.offsets[index])
        try:
            seg, _, _ = self.page.decode(data, index, jpegtables=self.page.jpegtables)
            assert seg is not None  # None only when decode is given no data
        except RuntimeError as err:  # imagecodecs' codec errors (Jpeg8Error, ...)
            y, x = divmod(index, self.ntx)
            raise InputError(STAGE, self.path, f"pixel data cannot be decoded at level "
                             f"{self.level}, tile {index} (level pixels x {x * self.tw}, "
                             f"y {y * self.th}) ({err})") from None
        return seg.reshape(self.th, self.tw, -1)[..., :3]

    def window_rect(self, tiles: dict[int, np.ndarray], lx: int, ly: int, w: int, h: int
                    ) -> np.ndarray:
        """Copy a ``w`` x ``h`` window at level pixel (lx, ly) out of decoded tiles."""
        tx, ty = lx // self.tw, ly // self.th
        if (lx + w <= min((tx + 1) * self.tw, self.width)
                and ly + h <= min((ty + 1) * self.th, self.height)):  # inside one tile
            x0, y0 = lx - tx * self.tw, ly - ty * self.th
            return tiles[ty * self.ntx + tx][y0:y0 + h, x0:x0 + w].copy()
        out = np.zeros((h, w, 3), np.uint8)  # outside the image: black, as OpenSlide gives
        last_row, last_col = (self.height - 1) // self.th, self.ntx - 1
        for ty in range(ly // self.th, min((ly + h - 1) // self.th, last_row) + 1):
            for tx in range(lx // self.tw, min((lx + w - 1) // self.tw, last_col) + 1):
                x0, y0 = tx * self.tw, ty * self.th
                sx, sy = max(lx, x0), max(ly, y0)
                ex, ey = min(lx + w, x0 + self.tw, self.width), min(ly + h, y0 + self.th, self.height)
                if ex > sx and ey > sy:
                    out[sy - ly:ey - ly, sx - lx:ex - lx] = \
                        tiles[ty * self.ntx + tx][sy - y0:ey - y0, sx - x0:ex - x0]
        return out

    def whole(self, *, threads: int) -> np.ndarray:
        """The whole level as (height, width, 3) uint8, its tiles decoded in ``threads``
        threads straight into place."""
        buf = np.empty((self.height, self.width, 3), np.uint8)

        def work(keys: range) -> None:
            for key in keys:
                ty, tx = divmod(key, self.ntx)
                y0, x0 = ty * self.th, tx * self.tw
                h, w = min(self.th, self.height - y0), min(self.tw, self.width - x0)
                buf[y0:y0 + h, x0:x0 + w] = self.tile(key)[:h, :w]

        keys = range(len(self.offsets))
        threads = max(1, min(threads, len(keys)))
        if threads == 1:
            work(keys)
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                list(pool.map(work, [keys[k::threads] for k in range(threads)]))
        return buf


def _touched_tiles(lxy: np.ndarray, r: int, tile: tuple[int, int], level_size: tuple[int, int]
                   ) -> set[int]:
    """Row-major indices of the ``tile`` (w, h) sized tiles of a level of ``level_size`` (w, h)
    that ``r`` x ``r`` windows at level pixels ``lxy`` (N, 2) touch."""
    (tw, th), (width, height) = tile, level_size
    ntx = -(-width // tw)
    x0, y0 = lxy[:, 0] // tw, lxy[:, 1] // th
    x1 = np.minimum((lxy[:, 0] + r - 1) // tw, ntx - 1)
    y1 = np.minimum((lxy[:, 1] + r - 1) // th, (height - 1) // th)
    need: set[int] = set()
    for ax, bx, ay, by in zip(x0.tolist(), x1.tolist(), y0.tolist(), y1.tolist()):
        need.update(ty * ntx + tx for ty in range(ay, by + 1) for tx in range(ax, bx + 1))
    return need


def _read_tiff(level: _TiffLevel, coords: np.ndarray, geom: SlideGeometry, threads: int,
               progress: Callable[[int], None] | None, out: np.ndarray) -> np.ndarray:
    """Patches from decoded tiles, each tile decoded once, in ``threads`` threads."""
    if geom.read_size == geom.patch_size:
        return _read_tiff_pieces(level, coords, geom, threads, progress, out)
    return _read_tiff_bands(level, coords, geom, threads, progress, out)


def _read_tiff_pieces(level: _TiffLevel, coords: np.ndarray, geom: SlideGeometry, threads: int,
                      progress: Callable[[int], None] | None, out: np.ndarray, task: int = 16
                      ) -> np.ndarray:
    """Patches read at their own size: each worker decodes a run of ``task`` tiles (row-major)
    and copies each tile's part of every patch it touches straight into ``out`` (workers write
    disjoint pixels), so a tile is used while it is hot and dropped at once; nothing waits
    for a band."""
    r = geom.read_size
    lxy = np.round(coords / geom.level_downsample).astype(np.int64)
    tw, th, ntx = level.tw, level.th, level.ntx
    # the part of a window outside the level stays black, as OpenSlide gives it
    outside = np.flatnonzero((lxy[:, 0] + r > level.width) | (lxy[:, 1] + r > level.height))
    out[outside] = 0
    pieces: dict[int, list[tuple[int, int, int, int, int, int, int]]] = {}
    for i, (lx, ly) in enumerate(lxy.tolist()):  # (patch, tile rows, tile cols, patch y, x)
        for ty in range(ly // th, min((ly + r - 1) // th, (level.height - 1) // th) + 1):
            sy, ey = max(ly, ty * th), min(ly + r, (ty + 1) * th, level.height)
            for tx in range(lx // tw, min((lx + r - 1) // tw, ntx - 1) + 1):
                sx, ex = max(lx, tx * tw), min(lx + r, (tx + 1) * tw, level.width)
                if ex <= sx or ey <= sy:  # the window starts past the image's edge
                    continue
                pieces.setdefault(ty * ntx + tx, []).append(
                    (i, sy - ty * th, ey - ty * th, sx - tx * tw, ex - tx * tw, sy - ly, sx - lx))
    keys = sorted(pieces)
    runs = [keys[k:k + task] for k in range(0, len(keys), task)]
    last_run = np.zeros(len(lxy), np.int64)  # a patch is done once the last run it needs is
    for j, run in enumerate(runs):
        for key in run:
            for piece in pieces[key]:
                last_run[piece[0]] = j
    finished = np.bincount(last_run, minlength=len(runs))
    if not runs and progress is not None:  # every window outside the level: all black
        progress(len(lxy))

    def work(run: list[int]) -> None:
        for key in run:
            tile = level.tile(key)
            for i, y0, y1, x0, x1, py, px in pieces[key]:
                out[i, py:py + y1 - y0, px:px + x1 - x0] = tile[y0:y1, x0:x1]

    pool = ThreadPoolExecutor(max_workers=max(1, threads))
    try:
        for j, future in enumerate([pool.submit(work, run) for run in runs]):
            future.result()
            if progress is not None and finished[j]:
                progress(int(finished[j]))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return out


def _read_tiff_bands(level: _TiffLevel, coords: np.ndarray, geom: SlideGeometry, threads: int,
                     progress: Callable[[int], None] | None, out: np.ndarray, band_rows: int = 1,
                     ahead: int = 2) -> np.ndarray:
    """Patches read at another size and resized, a band of tile rows at a time; each tile is
    decoded once.

    Pipelined: the worker threads decode the tiles of the next ``ahead`` bands while (and as
    soon as) others cut and resize the patches of the current band into ``out``, so no thread
    waits at a band's end. A tile is dropped once the band after it starts below its row.
    """
    r, size = geom.read_size, geom.patch_size
    lxy = np.round(coords / geom.level_downsample).astype(np.int64)
    order = np.lexsort((lxy[:, 0], lxy[:, 1]))
    band = lxy[order, 1] // (level.th * band_rows)
    cuts = np.flatnonzero(np.diff(band)) + 1
    groups = np.split(order, cuts)
    first_rows = [int(band[0]) * band_rows] + [int(b) * band_rows for b in band[cuts]]
    cache: dict[int, np.ndarray] = {}
    scheduled: set[int] = set()
    threads = max(1, threads)

    def decode(keys: list[int]) -> list[tuple[int, np.ndarray]]:
        return [(k, level.tile(k)) for k in keys]

    def cut(members: np.ndarray) -> None:
        for i in members.tolist():
            out[i] = _resize(level.window_rect(cache, int(lxy[i, 0]), int(lxy[i, 1]), r, r), size)

    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        def submit_decode(j: int) -> list[Future[list[tuple[int, np.ndarray]]]]:
            need = _touched_tiles(lxy[groups[j]], r, (level.tw, level.th), (level.width, level.height))
            todo = sorted(need - scheduled)
            scheduled.update(todo)
            return [pool.submit(decode, todo[k::threads]) for k in range(threads) if todo[k:]]

        decoding = [submit_decode(j) for j in range(min(ahead, len(groups)))]
        for j, members in enumerate(groups):
            for decoded in decoding[j]:
                cache.update(decoded.result())
            decoding[j] = []
            cutting = [pool.submit(cut, part) for part in np.array_split(members, threads)
                       if len(part)]
            if j + ahead < len(groups):
                decoding.append(submit_decode(j + ahead))
            for done in cutting:
                done.result()
            next_row = first_rows[j + 1] if j + 1 < len(groups) else level.height
            for key in [k for k in cache if k // level.ntx < next_row]:
                del cache[key]
            if progress is not None:
                progress(len(members))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return out


def _read_openslide(slide_path: str | os.PathLike, coords: np.ndarray, geom: SlideGeometry,
                    threads: int, progress: Callable[[int], None] | None, out: np.ndarray,
                    block: int = 1024) -> np.ndarray:
    """Fallback for formats without a plain tile grid: one ``read_region`` per block of
    neighbouring patches in worker threads, each thread with its own OpenSlide handle."""
    local = threading.local()
    opened: list[openslide.OpenSlide] = []
    r, ds = geom.read_size, geom.level_downsample
    cell = max(block, r) * ds
    keys = (coords[:, 1] // cell) * (1 << 31) + coords[:, 0] // cell
    order = np.argsort(keys, kind="stable")
    _, starts = np.unique(keys[order], return_index=True)

    def work(idx: np.ndarray) -> int:
        if not hasattr(local, "slide"):
            local.slide = openslide.OpenSlide(str(slide_path))
            opened.append(local.slide)
        x0, y0 = coords[idx, 0].min(), coords[idx, 1].min()
        lx = np.round((coords[idx, 0] - x0) / ds).astype(int)
        ly = np.round((coords[idx, 1] - y0) / ds).astype(int)
        size = (int(lx.max()) + r, int(ly.max()) + r)
        region = np.asarray(read_region(local.slide, slide_path, (int(x0), int(y0)), geom.level,
                                        size))
        for k, i in enumerate(idx):
            out[i] = _resize(np.ascontiguousarray(region[ly[k]:ly[k] + r, lx[k]:lx[k] + r, :3]),
                             geom.patch_size)
        return len(idx)

    try:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for n in pool.map(work, np.split(order, starts[1:])):
                if progress is not None:
                    progress(n)
    finally:
        for handle in opened:
            handle.close()
    return out


def read_patches(
    slide_path: str | os.PathLike,
    coords: np.ndarray,
    geom: SlideGeometry,
    *,
    threads: int,
    progress: Callable[[int], None] | None = None,
    direct: bool = True,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Read the patches at ``coords`` (level-0 corners) as (N, H, W, 3) uint8, fast.

    Pyramidal TIFF and Aperio SVS levels are read by decoding each needed tile once, in
    ``threads`` threads; other formats (or ``direct=False``) use batched OpenSlide reads.
    Either way the pixels equal :func:`read_patch` at the same corners. ``out`` (at least N
    rows) is a buffer to fill and reuse across calls: a fresh multi-GB array costs seconds of
    page faults, more than decoding its tiles.
    """
    shape = (len(coords), geom.patch_size, geom.patch_size, 3)
    if out is None:
        out = np.empty(shape, np.uint8)
    elif out.dtype != np.uint8 or out.shape[1:] != shape[1:] or len(out) < len(coords):
        raise ValueError(f"out buffer {out.shape} {out.dtype} cannot hold uint8 patches {shape}")
    out = out[:len(coords)]
    if len(coords) == 0:
        return out
    level = None
    if direct:
        level = _TiffLevel.open(slide_path, geom.vendor, geom.level, geom.level_dims)
    if level is None:
        return _read_openslide(slide_path, coords, geom, threads, progress, out)
    try:
        return _read_tiff(level, coords, geom, threads, progress, out)
    finally:
        level.close()


def decode_tiles(slide_path: str | os.PathLike, coords: np.ndarray, geom: SlideGeometry, *,
                 threads: int) -> int:
    """Decode, in ``threads`` threads, exactly the tiles of level ``geom.level`` that the patches
    at ``coords`` (level-0 corners) touch, each once, and return how many.

    Nothing is cut, resized or stored: this is the decode limit that :func:`read_patches` can
    at best reach on the same patches (benchmarks compare against it). Levels without a direct
    tile reader (see :func:`read_patches`) are decoded with one OpenSlide ``read_region`` per
    internal tile, each thread with its own handle.
    """
    if len(coords) == 0:
        return 0
    lxy = np.round(np.asarray(coords) / geom.level_downsample).astype(np.int64)
    r, threads = geom.read_size, max(1, threads)
    level = _TiffLevel.open(slide_path, geom.vendor, geom.level, geom.level_dims)
    if level is not None:
        tw, th, (width, height) = level.tw, level.th, (level.width, level.height)
    else:
        with openslide.OpenSlide(str(slide_path)) as slide:
            tw = th = _tile_size(slide, geom.level)
        width, height = geom.level_dims
    ntx = -(-width // tw)
    todo = sorted(_touched_tiles(lxy, r, (tw, th), (width, height)))
    chunks = [todo[k::threads] for k in range(threads)]
    if level is not None:
        tiff = level

        def work(keys: list[int]) -> int:
            for key in keys:
                tiff.tile(key)
            return len(keys)
    else:
        ds = geom.level_downsample

        def work(keys: list[int]) -> int:
            with openslide.OpenSlide(str(slide_path)) as own:
                for key in keys:
                    ty, tx = divmod(key, ntx)
                    size = (min(tw, width - tx * tw), min(th, height - ty * th))
                    read_region(own, slide_path, (round(tx * tw * ds), round(ty * th * ds)),
                                geom.level, size)
            return len(keys)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return sum(pool.map(work, chunks))
    finally:
        if level is not None:
            level.close()


def iter_level_tiles(slide: openslide.OpenSlide, level: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(x0, y0, w, h)`` of each internal tile of ``level`` (level-0 origin, level size)."""
    tile = _tile_size(slide, level)
    width, height = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    for ty in range(0, height, tile):
        for tx in range(0, width, tile):
            yield (int(round(tx * ds)), int(round(ty * ds)), min(tile, width - tx),
                   min(tile, height - ty))
