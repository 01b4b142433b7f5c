"""Deterministic synthetic Camelyon16-shaped demo cohort.

Slides are rendered as stain concentrations (hematoxylin, eosin) and turned into RGB by
Beer-Lambert with a per-centre stain matrix, then written as pyramidal tiled JPEG TIFFs that
OpenSlide opens (generic-tiff, mpp recorded, no objective power). Normal tissue looks like lymph
node (dense small round lymphocyte nuclei, with paler germinal centres); tumour regions hold
larger, irregular, vesicular nuclei in pinker cytoplasm and are annotated as ASAP XML polygons.
The layout is the official Camelyon16 one, so the demo exercises the real preset's code path.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from matplotlib.path import Path as MplPath
from scipy import ndimage
from skimage import draw, measure
from tqdm import tqdm

from histodistill.annotations import write_asap_xml
from histodistill.io import atomic_path

# Per-centre stain matrices (rows: hematoxylin, eosin; OD per unit concentration) and
# intensity. Centre 0 uses a typical Macenko estimate of H&E; centre 1 is bluer, with paler
# eosin, as scanners and staining protocols differ between hospitals.
CENTRES = (
    {"stains": [[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]], "h": 1.0, "e": 1.0, "io": 245},
    {"stains": [[0.4600, 0.7800, 0.4300], [0.3300, 0.8500, 0.4100]], "h": 1.2, "e": 0.75, "io": 235},
)


@dataclass(frozen=True)
class DemoSpec:
    """Size and content of the demo cohort (config section ``demo``)."""

    n_train: int = 8  # half normal, half tumour
    n_test: int = 4
    width: int = 4096  # level-0 pixels
    height: int = 3072
    mpp: float = 0.5  # level 0 is 20x by the 10/mpp convention
    levels: int = 4  # downsample 2 between levels
    seed: int = 0
    jpeg_quality: int = 90


def _unit(v: list[float]) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


def _upsample(field: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    zoom = (shape[0] / field.shape[0], shape[1] / field.shape[1])
    return ndimage.zoom(field, zoom, order=1, mode="nearest")[: shape[0], : shape[1]]


def _tissue(rng: np.random.Generator, lo: tuple[int, int]) -> np.ndarray:
    """Low-resolution tissue field (> 0 is tissue): lumpy ellipse with ragged edges and holes."""
    h, w = lo
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = h * rng.uniform(0.42, 0.58), w * rng.uniform(0.42, 0.58)
    ry, rx = h * rng.uniform(0.30, 0.40), w * rng.uniform(0.30, 0.40)
    envelope = 1.0 - np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return envelope + 0.25 * _smooth_noise(rng, lo, 6) + 0.08 * _smooth_noise(rng, lo, 2)


def _tumour_polygons(rng: np.random.Generator, tissue_lo: np.ndarray, cell: int
                     ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Irregular tumour polygons (level-0 x, y) inside the tissue, covering roughly half of it.

    Returns ``(tumour, exclusion)``: contours nested an odd number of times are holes, written
    as Camelyon16 exclusion polygons (group ``_2``).
    """
    field = _smooth_noise(rng, tissue_lo.shape, 7)
    inside = tissue_lo > 0.1
    level = np.quantile(field[inside], rng.uniform(0.4, 0.55))
    field = np.where(inside, field - level, -1.0)
    polys = []
    for contour in measure.find_contours(np.pad(field, 1, constant_values=-1.0), 0.0):
        contour = measure.approximate_polygon(contour - 1, tolerance=0.6)
        if len(contour) >= 4 and _area(contour) > 30:
            polys.append(np.stack([(contour[:, 1] + 0.5) * cell, (contour[:, 0] + 0.5) * cell], 1))
    depth = [sum(MplPath(q).contains_point(p[0]) for q in polys if q is not p) for p in polys]
    return ([p for p, d in zip(polys, depth) if d % 2 == 0],
            [p for p, d in zip(polys, depth) if d % 2 == 1])


def _area(poly: np.ndarray) -> float:
    y, x = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _stamp_bank(rng: np.random.Generator, radius: float, irregular: float, vesicular: bool,
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


def _scatter(canvas: np.ndarray, rng: np.random.Generator, density: np.ndarray, cell: int,
             bank: list[np.ndarray], strength: tuple[float, float]) -> None:
    """Drop nuclei as a Poisson process whose intensity map is ``density`` (per level-0 px)."""
    counts = rng.poisson(density * cell * cell)
    iy, ix = np.nonzero(counts)
    reps = counts[iy, ix]
    ys = (np.repeat(iy, reps) + rng.random(reps.sum())) * cell
    xs = (np.repeat(ix, reps) + rng.random(reps.sum())) * cell
    pad = max(b.shape[0] for b in bank)
    for y, x, k, s in zip(ys.astype(int), xs.astype(int), rng.integers(0, len(bank), len(ys)),
                          rng.uniform(*strength, len(ys))):
        stamp = bank[k]
        sz = stamp.shape[0]
        y0, x0 = y - sz // 2 + pad, x - sz // 2 + pad
        view = canvas[y0:y0 + sz, x0:x0 + sz]
        np.maximum(view, stamp * s, out=view)


def _rasterise(polys: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for poly in polys:
        rr, cc = draw.polygon(poly[:, 1], poly[:, 0], shape)
        mask[rr, cc] = True
    return mask


def render_slide(rng: np.random.Generator, spec: DemoSpec, tumour: bool, centre: int
                 ) -> tuple[np.ndarray, dict[str, list[np.ndarray]]]:
    """Render one slide: (H, W, 3) uint8 RGB at level 0 and its polygons by ASAP group."""
    cell = 16
    lo = (spec.height // cell, spec.width // cell)
    shape = (spec.height, spec.width)
    tissue_lo = _tissue(rng, lo)
    polys, holes = _tumour_polygons(rng, tissue_lo, cell) if tumour else ([], [])
    tissue = _upsample(tissue_lo, shape) > 0
    # Same rule as label reading: inside any tumour polygon and outside every exclusion.
    tum = _rasterise(polys, shape) & ~_rasterise(holes, shape) & tissue

    # Region maps at low resolution: germinal centres (normal, paler, larger nuclei), sinuses.
    germinal = (_smooth_noise(rng, lo, 5) > rng.uniform(1.2, 1.6)) & (tissue_lo > 0)
    sinus = _smooth_noise(rng, lo, 3) > 1.4
    tum_lo = ndimage.zoom(tum.astype(np.float32), 1 / cell, order=1)[: lo[0], : lo[1]] > 0.5
    tis_lo = ndimage.zoom(tissue.astype(np.float32), 1 / cell, order=1)[: lo[0], : lo[1]] > 0.5
    normal_lo = tis_lo & ~tum_lo

    pad = 64
    hema = np.zeros((shape[0] + 2 * pad, shape[1] + 2 * pad), np.float32)
    lymph_r = rng.uniform(5.5, 7.0)  # level-0 px (0.5 um): 5.5-7 um diameter lymphocytes
    dens_l = rng.uniform(0.0016, 0.0024)
    lymph = np.where(normal_lo & ~germinal & ~sinus, dens_l, 0.0) + np.where(
        normal_lo & sinus, dens_l * 0.25, 0.0)
    _scatter(hema, rng, lymph, cell, _stamp_bank(rng, lymph_r, 0.15, False), (0.9, 1.25))
    _scatter(hema, rng, np.where(normal_lo & germinal, 0.0008, 0.0), cell,
             _stamp_bank(rng, lymph_r * 1.5, 0.3, True), (0.7, 1.0))
    if tumour:
        grade = rng.uniform(1.5, 2.1)  # tumour nuclear size relative to lymphocytes
        _scatter(hema, rng, np.where(tum_lo, rng.uniform(0.0006, 0.0009), 0.0), cell,
                 _stamp_bank(rng, lymph_r * grade, 0.45, True), (0.75, 1.1))
        _scatter(hema, rng, np.where(tum_lo, dens_l * 0.2, 0.0), cell,
                 _stamp_bank(rng, lymph_r, 0.15, False), (0.9, 1.2))
    hema = hema[pad:-pad, pad:-pad]

    fibres = _upsample(ndimage.gaussian_filter(rng.standard_normal((shape[0] // 4, shape[1] // 4)),
                                               (0.8, 3.0)), shape)
    fibres = (fibres - fibres.mean()) / (fibres.std() + 1e-6)
    eosin = np.where(tissue, 0.45 + 0.12 * fibres, 0.0) + np.where(tum, 0.12, 0.0)
    eosin = np.clip(eosin, 0, None).astype(np.float32)
    hema = hema * 0.95 + np.where(tissue, 0.04, 0.0).astype(np.float32)

    c = CENTRES[centre]
    stains = np.stack([_unit(v) for v in c["stains"]]).astype(np.float32)
    conc = np.stack([hema * c["h"], eosin * c["e"]], -1)
    od = conc @ stains + rng.normal(0, 0.012, shape + (1,)).astype(np.float32)
    rgb = c["io"] * np.exp(-np.clip(od, 0, None))
    return np.clip(rgb, 0, 255).astype(np.uint8), {"_0": polys, "_2": holes}


def write_pyramid(path: str | os.PathLike, rgb: np.ndarray, mpp: float, levels: int,
                  quality: int = 90, tile: int = 256) -> None:
    """Write a pyramidal tiled JPEG TIFF that OpenSlide opens (each level a top-level page)."""
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        img = rgb
        for level in range(levels):
            res = 1e4 / (mpp * 2 ** level)  # pixels per centimetre
            tif.write(img, tile=(tile, tile), photometric="rgb", compression="jpeg",
                      compressionargs={"level": quality},
                      resolution=(res, res), resolutionunit="CENTIMETER",
                      subfiletype=0 if level == 0 else 1)
            h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
            img = img[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3)).astype(np.uint8)


def plan(spec: DemoSpec) -> list[dict]:
    """Slide names, labels, centres and splits, balanced across labels, centres and splits.

    Training slides follow Camelyon16's naming: the first half of each label's numbers come from
    centre 0 and the rest from centre 1 (``centre_split`` in config holds that boundary).
    """
    rows = []
    per_label = spec.n_train // 2
    for label in ("normal", "tumor"):
        for k in range(1, per_label + 1):
            rows.append({"slide": f"{label}_{k:03d}", "label": label,
                         "centre": int(k > per_label // 2), "split": "train"})
    for k in range(1, spec.n_test + 1):
        rows.append({"slide": f"test_{k:03d}", "label": "tumor" if k % 2 == 0 else "normal",
                     "centre": ((k - 1) // 2) % 2, "split": "test"})
    return rows


def make_cohort(out: str | os.PathLike, spec: DemoSpec, progress: bool = True) -> Path:
    """Write the cohort under ``out`` in the Camelyon16 layout; return ``out``.

    ``training/{normal,tumor}/*.tif``, ``training/lesion_annotations/tumor_*.xml``,
    ``testing/images/test_*.tif``, ``testing/lesion_annotations/test_*.xml``,
    ``testing/reference.csv`` and a ``slides.csv`` with every slide's label, centre and split.
    """
    out = Path(out)
    rows = plan(spec)
    with atomic_path(out) as tmp:
        for sub in ("training/normal", "training/tumor", "training/lesion_annotations",
                    "testing/images", "testing/lesion_annotations"):
            (tmp / sub).mkdir(parents=True)
        for i, row in enumerate(tqdm(rows, desc="demo slides", disable=not progress)):
            rng = np.random.default_rng([spec.seed, i])
            rgb, polys = render_slide(rng, spec, row["label"] == "tumor", row["centre"])
            if row["split"] == "train":
                img_dir, ann_dir = tmp / "training" / row["label"], tmp / "training/lesion_annotations"
            else:
                img_dir, ann_dir = tmp / "testing/images", tmp / "testing/lesion_annotations"
            write_pyramid(img_dir / f"{row['slide']}.tif", rgb, spec.mpp, spec.levels, spec.jpeg_quality)
            if polys["_0"]:
                write_asap_xml(ann_dir / f"{row['slide']}.xml", polys)
        with open(tmp / "testing/reference.csv", "w", newline="") as f:
            writer = csv.writer(f)
            for row in rows:
                if row["split"] == "test":
                    writer.writerow([row["slide"], row["label"].capitalize()])
        with open(tmp / "slides.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["slide", "label", "centre", "split"])
            writer.writeheader()
            writer.writerows(rows)
    return out
