"""Rendering primitives shared by the two synthetic demos (the WSI cohort of
:mod:`histodistill.synth.cohort` and the pre-tiled patches of :mod:`histodistill.synth.patches`):
the stain centres, nucleus stamps dropped by a Poisson process, and Beer-Lambert staining."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

# Per-centre stain matrices (rows: hematoxylin, eosin; OD per unit concentration) and
# intensity. Centre 0 uses a typical Macenko estimate of H&E; centre 1 is bluer, with paler
# eosin, as scanners and staining protocols differ between hospitals. Centre 2 (purple
# hematoxylin, magenta eosin, brighter scanner) is used only by the patch demo's test split.
# Centre 3 is an older, dimmer scanner with dark blue hematoxylin and dull eosin; centre 4 a
# faded batch with pale hematoxylin and strong eosin. Slides jitter their centre's values.
CENTRES: tuple[dict[str, Any], ...] = (
    {"stains": [[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]], "h": 1.0, "e": 1.0, "io": 245},
    {"stains": [[0.4600, 0.7800, 0.4300], [0.3300, 0.8500, 0.4100]], "h": 1.2, "e": 0.75, "io": 235},
    {"stains": [[0.6500, 0.7000, 0.3000], [0.1200, 0.8600, 0.5000]], "h": 0.9, "e": 1.2, "io": 250},
    {"stains": [[0.6200, 0.7400, 0.2600], [0.3000, 0.7600, 0.5700]], "h": 1.8, "e": 0.6, "io": 214},
    {"stains": [[0.5000, 0.7600, 0.4200], [0.1000, 0.8200, 0.5600]], "h": 0.6, "e": 1.7, "io": 252},
)


def unit_vector(v: list[float]) -> np.ndarray:
    """``v`` scaled to unit length (a stain's optical-density direction)."""
    arr = np.asarray(v, np.float64)
    return arr / np.linalg.norm(arr)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int],
                 sigma: float | tuple[float, float]) -> np.ndarray:
    """Gaussian-smoothed white noise of ``shape`` (wrapping at the edges), standardised to mean 0
    and standard deviation 1: the texture of tissue density and stain uptake fields."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


def upsample(field: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear zoom of a low-resolution ``field`` to ``shape`` (cropped to it exactly)."""
    zoom = (shape[0] / field.shape[0], shape[1] / field.shape[1])
    return ndimage.zoom(field, zoom, order=1, mode="nearest")[: shape[0], : shape[1]]


def stamp_bank(rng: np.random.Generator, radius: float, irregular: float, vesicular: bool,
               n: int = 48) -> list[np.ndarray]:
    """Pre-rendered nucleus stamps (hematoxylin concentration) of a given kind."""
    bank = []
    size = int(np.ceil(radius * (1 + irregular) * 1.6)) * 2 + 3
    c = size // 2
    yy, xx = np.mgrid[0:size, 0:size] - c
    ang = np.arctan2(yy, xx)
    dist = np.hypot(yy, xx)
    for _ in range(n):
        r = radius * rng.uniform(0.8, 1.2)
        ecc = rng.uniform(1.0, 1.0 + irregular)
        rot = rng.uniform(0, np.pi)
        harmonics = sum(rng.normal(0, irregular * 0.15) * np.cos(k * ang + rng.uniform(0, 6.3))
                        for k in (2, 3, 5))
        rr = r * (1 + harmonics) / np.sqrt(ecc * np.abs(np.cos(ang - rot)) ** 2
                                            + np.abs(np.sin(ang - rot)) ** 2 / ecc)
        body = np.clip(rr - dist + 0.5, 0, 1)  # anti-aliased edge
        if vesicular:  # pale centre, dark rim, a nucleolus
            rim = np.clip(1.0 - (rr - dist) / (0.45 * r), 0.35, 1.0)
            nucleolus = np.exp(-((yy - rng.normal(0, r / 4)) ** 2 + (xx - rng.normal(0, r / 4)) ** 2)
                               / (2 * (0.15 * r) ** 2))
            stamp = body * (0.8 * rim + 0.5 * nucleolus)
        else:
            stamp = body * rng.uniform(0.85, 1.0)
        bank.append(stamp.astype(np.float32))
    return bank


def scatter(canvas: np.ndarray, rng: np.random.Generator, density: np.ndarray, cell: int,
            bank: list[np.ndarray], strength: tuple[float, float]) -> None:
    """Drop nuclei as a Poisson process whose intensity map is ``density`` (per level-0 px)."""
    counts = rng.poisson(density * cell * cell)
    iy, ix = np.nonzero(counts)
    reps = counts[iy, ix]
    ys = (np.repeat(iy, reps) + rng.random(reps.sum())) * cell
    xs = (np.repeat(ix, reps) + rng.random(reps.sum())) * cell
    stamp_at(canvas, ys.astype(int), xs.astype(int), rng, bank, strength,
           pad=max(b.shape[0] for b in bank))


def beer_lambert(hema: np.ndarray, eosin: np.ndarray, stains: list, io: float,
                 noise: np.ndarray) -> np.ndarray:
    """Float RGB of hematoxylin and eosin concentrations under two stain OD vectors (rows of
    ``stains``, normalised here) and light intensity ``io``; ``noise`` is added to the OD."""
    unit = np.stack([unit_vector(v) for v in stains]).astype(np.float32)
    od = np.stack([hema, eosin], -1) @ unit + noise
    return io * np.exp(-np.clip(od, 0, None))


PAD = 96  # level-0 px around slide canvases (> half the largest stamp)


def stamp_at(canvas: np.ndarray, ys: np.ndarray, xs: np.ndarray, rng: np.random.Generator,
             bank: list[np.ndarray], strength: tuple[float, float], pad: int = PAD) -> None:
    """Stamp a random kernel of ``bank``, scaled by a draw from ``strength``, at each level-0
    position into ``canvas`` (padded by ``pad``), keeping the maximum."""
    for y, x, k, s in zip(ys, xs, rng.integers(0, len(bank), len(ys)),
                          rng.uniform(*strength, len(ys))):
        stamp = bank[k]
        sz = stamp.shape[0]
        y0, x0 = y - sz // 2 + pad, x - sz // 2 + pad
        view = canvas[y0:y0 + sz, x0:x0 + sz]
        np.maximum(view, stamp * s, out=view)
