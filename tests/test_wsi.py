"""Slide reading, magnification, Otsu mask, patch grid and fast reads."""

from __future__ import annotations

import math

import numpy as np
import openslide
import pytest
import tifffile

from histodistill import config
from histodistill.slides import wsi
from histodistill.io import InputError

_TILING = config.defaults("$defs/tiling")
MASK = {"mask_mpp": _TILING["mask_mpp"], "max_size": _TILING["mask_max_size"],
        "min_saturation": _TILING["min_saturation"], "threads": 1}  # the tiler's settings


def test_openslide_reads_demo_slide_at_every_level(tumour_slide):
    slide = wsi.open_slide(tumour_slide)
    assert slide.level_count == 3
    assert slide.properties["openslide.vendor"] == "generic-tiff"
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
    for level, (w, h) in enumerate(slide.level_dimensions):
        assert (w, h) == (1024 >> level, 768 >> level)
        region = np.asarray(slide.read_region((0, 0), level, (min(w, 300), min(h, 300))))
        assert region.shape[2] == 4 and region[..., 3].min() == 255
    # tissue is rendered: the slide is not blank at the lowest level
    low = np.asarray(slide.read_region((0, 0), 2, slide.level_dimensions[2]).convert("RGB"))
    assert low.std() > 10


def test_openslide_reads_cmu_svs_at_every_level(cmu_slide):
    slide = wsi.open_slide(cmu_slide)
    assert slide.properties["openslide.vendor"] == "aperio"
    assert slide.dimensions == (2220, 2967)
    for level in range(slide.level_count):
        region = np.asarray(slide.read_region((1000, 1400), level, (256, 256)).convert("RGB"))
        assert region.shape == (256, 256, 3) and region.std() > 5
    mpp, mag = wsi.base_resolution(slide, cmu_slide)
    assert mpp == pytest.approx(0.499) and mag == 20


@pytest.mark.parametrize(
    "mag, level, read",
    [(20, 0, 64), (10, 1, 64), (5, 2, 64), (7, 1, 91)],  # 7x: read 64*(20/7)/2 px, resize
)
def test_geometry_picks_coarsest_sufficient_level(tumour_slide, mag, level, read):
    geom = wsi.geometry(wsi.open_slide(tumour_slide), tumour_slide, mag, 64, 64)
    assert (geom.level, geom.read_size) == (level, read)
    assert geom.scale == pytest.approx(20 / mag)


def test_geometry_single_level_svs_resizes(cmu_slide):
    geom = wsi.geometry(wsi.open_slide(cmu_slide), cmu_slide, 10, 256, 256)
    assert (geom.level, geom.read_size) == (0, 512)


def test_magnification_above_scan_is_an_error(tumour_slide):
    with pytest.raises(InputError, match="exceeds"):
        wsi.geometry(wsi.open_slide(tumour_slide), tumour_slide, 40, 64, 64)


def test_missing_mpp_names_the_config_key(tmp_path):
    path = tmp_path / "nompp.tif"
    tifffile.imwrite(path, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), photometric="rgb")
    slide = wsi.open_slide(path)
    with pytest.raises(InputError, match="tiling.default_mpp"):
        wsi.base_resolution(slide, path)
    assert wsi.base_resolution(slide, path, default_mpp=0.25) == (0.25, 40.0)


def brute_force(slide, geom, mask, down, threshold):
    """Independent per-patch check: enumerate positions, test every mask pixel's centre."""
    size0, step0 = geom.patch_size * geom.scale, geom.stride * geom.scale
    w0, h0 = slide.dimensions
    kept = []
    for y in np.arange(0, h0 - size0 + 1e-6, step0):
        for x in np.arange(0, w0 - size0 + 1e-6, step0):
            x, y = round(x), round(y)
            inside = total = 0
            for i in range(mask.shape[0]):
                cy = (i + 0.5) * down[1]
                if not (y <= cy < y + size0):
                    continue
                for j in range(mask.shape[1]):
                    cx = (j + 0.5) * down[0]
                    if x <= cx < x + size0:
                        total += 1
                        inside += bool(mask[i, j])
            frac = inside / total if total else 0.0
            if frac >= threshold:
                kept.append((x, y, frac))
    return kept


@pytest.mark.parametrize("mag, size, stride", [(10, 64, 64), (5, 32, 24)])
def test_grid_and_tissue_fraction_match_brute_force(tumour_slide, mag, size, stride):
    slide = wsi.open_slide(tumour_slide)
    geom = wsi.geometry(slide, tumour_slide, mag, size, stride)
    mask, down = wsi.tissue_mask(slide, tumour_slide, geom.base_mpp, **{**MASK, "mask_mpp": 16.0})
    coords = wsi.grid(*slide.dimensions, geom)
    frac = wsi.box_fraction(mask, down, coords, size * geom.scale)
    fast = [(int(x), int(y), f) for (x, y), f in zip(coords, frac) if f >= 0.5]
    slow = brute_force(slide, geom, mask, down, 0.5)
    assert 0 < len(fast) == len(slow) < len(coords)
    assert [(x, y) for x, y, _ in fast] == [(x, y) for x, y, _ in slow]
    np.testing.assert_allclose([f for *_, f in fast], [f for *_, f in slow])


def test_grid_covers_slide_without_overhang():
    geom = wsi.SlideGeometry(0.5, 20, 2.0, 1, 2.0, 64, 64, 48)
    coords = wsi.grid(1000, 700, geom)
    assert coords[:, 0].max() + 128 <= 1000 and coords[:, 1].max() + 128 <= 700
    assert len(coords) == (math.floor((1000 - 128) / 96) + 1) * (math.floor((700 - 128) / 96) + 1)


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("which, mag, size, stride", [
    ("cmu", 20, 256, 256),  # 240 px JPEG tiles, not aligned with patches
    ("cmu", 10, 128, 96),  # single level: read 256 px, resize
    ("demo", 10, 64, 48),  # level 1 of the pyramid, overlapping patches
    ("demo", 7, 48, 48),  # between levels: read level 1, resize
])
def test_fast_reader_equals_one_read_per_patch(cmu_slide, tumour_slide, which, mag, size, stride,
                                               direct):
    path = cmu_slide if which == "cmu" else tumour_slide
    slide = wsi.open_slide(path)
    geom = wsi.geometry(slide, path, mag, size, stride)
    coords = wsi.grid(*slide.dimensions, geom)[::3]
    fast = wsi.read_patches(path, coords, geom, threads=2, direct=direct)
    naive = np.stack([wsi.read_patch(slide, xy, geom) for xy in coords])
    np.testing.assert_array_equal(fast, naive)


@pytest.mark.parametrize("which, mag, size, stride", [("cmu", 20, 256, 256), ("demo", 7, 48, 48)])
def test_threads_and_decode_limit(cmu_slide, tumour_slide, which, mag, size, stride):
    """One thread or several, the same mask and patches; decode_tiles decodes each tile the
    patches touch once, directly or through OpenSlide."""
    path = cmu_slide if which == "cmu" else tumour_slide
    slide = wsi.open_slide(path)
    geom = wsi.geometry(slide, path, mag, size, stride)
    one, down = wsi.tissue_mask(slide, path, geom.base_mpp, **{**MASK, "mask_mpp": 1.0})  # a level of tiles
    three, down3 = wsi.tissue_mask(slide, path, geom.base_mpp, **{**MASK, "mask_mpp": 1.0, "threads": 3})
    np.testing.assert_array_equal(one, three)
    assert down == down3
    coords = wsi.grid(*slide.dimensions, geom)[1::2]
    done: list[int] = []
    np.testing.assert_array_equal(wsi.read_patches(path, coords, geom, threads=1),
                                  wsi.read_patches(path, coords, geom, threads=3, progress=done.append))
    assert sum(done) == len(coords) and all(done)
    tile = int(slide.properties[f"openslide.level[{geom.level}].tile-width"])
    lxy = np.round(coords / geom.level_downsample).astype(int)
    width, height = geom.level_dims
    touched = {(ty, tx) for lx, ly in lxy
               for ty in range(ly // tile, min(ly + geom.read_size - 1, height - 1) // tile + 1)
               for tx in range(lx // tile, min(lx + geom.read_size - 1, width - 1) // tile + 1)}
    assert wsi.decode_tiles(path, coords, geom, threads=2) == len(touched) > 0
    via_openslide = wsi.SlideGeometry(**{**vars(geom), "vendor": "other"})
    assert wsi.decode_tiles(path, coords, via_openslide, threads=2) == len(touched)
    assert wsi.decode_tiles(path, coords[:0], geom, threads=2) == 0


def test_blank_slide_has_empty_mask(tmp_path):
    path = tmp_path / "blank.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(np.full((1024, 1024, 3), 238, np.uint8), tile=(256, 256), photometric="rgb",
                  resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    slide = wsi.open_slide(path)
    mask, _ = wsi.tissue_mask(slide, path, 0.5, **MASK)
    assert not mask.any()


def test_corrupt_and_missing_slides_name_the_file(tmp_path):
    bad = tmp_path / "corrupt.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 100)
    with pytest.raises(InputError, match=r"\[tile\] .*corrupt.svs: cannot be read"):
        wsi.open_slide(bad)
    with pytest.raises(InputError, match=r"missing.tif: slide file does not exist"):
        wsi.open_slide(tmp_path / "missing.tif")
