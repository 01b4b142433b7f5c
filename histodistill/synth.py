"""Deterministic synthetic Camelyon16-shaped demo cohort.

Slides are rendered as stain concentrations (hematoxylin, eosin) and turned into RGB by
Beer-Lambert with a per-slide stain matrix, then written as pyramidal tiled JPEG TIFFs that
OpenSlide opens (generic-tiff, mpp recorded, no objective power). Normal tissue looks like lymph
node: sheets of small dark round lymphocytes, follicles whose germinal centres hold larger, paler,
vesicular centroblasts and tingible-body macrophages, sinuses lined by histiocytes with pink
cytoplasm, and a fibrous capsule with trabeculae. Metastases hold larger, irregular, vesicular
nuclei with nucleoli in pinker cytoplasm, cut by desmoplastic stroma and infiltrated by
lymphocytes; they are annotated as ASAP XML polygons. The classes differ consistently in nuclear
morphology; staining differs strongly between centres and between the slides of a centre (stain
vectors, strength, light, section thickness, focus), and germinal centres and sinuses mimic
tumour, so a few patches cannot cover a class. The layout is the official Camelyon16 one, so the
demo exercises the real preset's code path.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from matplotlib.path import Path as MplPath
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import measure
from tqdm import tqdm

from histodistill.slides.annotations import write_asap_xml
from histodistill.io import atomic_path
from histodistill.data.store import SPLITS

# Per-centre stain matrices (rows: hematoxylin, eosin; OD per unit concentration) and
# intensity. Centre 0 uses a typical Macenko estimate of H&E; centre 1 is bluer, with paler
# eosin, as scanners and staining protocols differ between hospitals. Centre 2 (purple
# hematoxylin, magenta eosin, brighter scanner) is used only by the patch demo's test split.
# Centre 3 is an older, dimmer scanner with dark blue hematoxylin and dull eosin; centre 4 a
# faded batch with pale hematoxylin and strong eosin. Slides jitter their centre's values.
CENTRES = (
    {"stains": [[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]], "h": 1.0, "e": 1.0, "io": 245},
    {"stains": [[0.4600, 0.7800, 0.4300], [0.3300, 0.8500, 0.4100]], "h": 1.2, "e": 0.75, "io": 235},
    {"stains": [[0.6500, 0.7000, 0.3000], [0.1200, 0.8600, 0.5000]], "h": 0.9, "e": 1.2, "io": 250},
    {"stains": [[0.6200, 0.7400, 0.2600], [0.3000, 0.7600, 0.5700]], "h": 1.8, "e": 0.6, "io": 214},
    {"stains": [[0.5000, 0.7600, 0.4200], [0.1000, 0.8200, 0.5600]], "h": 0.6, "e": 1.7, "io": 252},
)
# Demo slides: the training split mixes centres 0-4 (centre 0 first, as Radboud UMC in
# Camelyon16); the test split mixes centres 1-4, so the two mixes differ.
SLIDE_TRAIN_CENTRES = (0, 1, 2, 3, 4)
SLIDE_TEST_CENTRES = (1, 2, 3, 4)
STAIN_VARIATION = 0.25  # log-sd of each stain's uptake from patch to patch within a slide
# Scanner focus of each centre: Gaussian blur sigma in level-0 px (centre 3 is the oldest).
SLIDE_FOCUS = (0.6, 0.9, 0.4, 1.5, 1.0)


@dataclass(frozen=True)
class DemoSpec:
    """Size and content of the demo cohort (config section ``demo``)."""

    n_train: int = 28  # half normal, half tumour
    n_test: int = 12  # one normal slide to two tumour slides, so test patches are about balanced
    width: int = 2048  # level-0 pixels
    height: int = 1536
    mpp: float = 0.5  # level 0 is 20x by the 10/mpp convention
    levels: int = 4  # downsample 2 between levels
    seed: int = 0
    jpeg_quality: int = 90


def _unit(v: list[float]) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int],
                  sigma: float | tuple[float, float]) -> np.ndarray:
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


def _tumour_polygons(rng: np.random.Generator, tissue_lo: np.ndarray, cell: int,
                     coverage: float = 0.5, sigma: float = 7.0
                     ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Irregular tumour polygons (level-0 x, y) covering about ``coverage`` of the tissue, with
    blobs about ``sigma`` low-resolution cells across.

    Returns ``(tumour, exclusion)``: contours nested an odd number of times are holes, written
    as Camelyon16 exclusion polygons (group ``_2``).
    """
    field = _smooth_noise(rng, tissue_lo.shape, sigma)
    inside = tissue_lo > 0.1
    level = np.quantile(field[inside], 1.0 - coverage)
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
    _stamp(canvas, ys.astype(int), xs.astype(int), rng, bank, strength,
           pad=max(b.shape[0] for b in bank))


def _rasterise(polys: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) mask of the polygons' interiors (vertices as level-0 x, y)."""
    img = Image.new("1", (shape[1], shape[0]), 0)
    canvas = ImageDraw.Draw(img)
    for poly in polys:
        canvas.polygon([tuple(p) for p in poly.tolist()], fill=1)
    return np.array(img, bool)


def _beer_lambert(hema: np.ndarray, eosin: np.ndarray, stains: list, io: float,
                  noise: np.ndarray) -> np.ndarray:
    """Float RGB of hematoxylin and eosin concentrations under two stain OD vectors (rows of
    ``stains``, normalised here) and light intensity ``io``; ``noise`` is added to the OD."""
    unit = np.stack([_unit(v) for v in stains]).astype(np.float32)
    od = np.stack([hema, eosin], -1) @ unit + noise
    return io * np.exp(-np.clip(od, 0, None))


_PAD = 96  # level-0 px around slide canvases (> half the largest stamp)


def _place(rng: np.random.Generator, density: np.ndarray, cell: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 (y, x) of a Poisson process whose intensity (per level-0 px²) is ``density``,
    one value per ``cell`` x ``cell`` block."""
    counts = rng.poisson(np.clip(density, 0, None) * cell * cell)
    iy, ix = np.nonzero(counts)
    reps = counts[iy, ix]
    ys = (np.repeat(iy, reps) + rng.random(reps.sum())) * cell
    xs = (np.repeat(ix, reps) + rng.random(reps.sum())) * cell
    return ys.astype(int), xs.astype(int)


def _stamp(canvas: np.ndarray, ys: np.ndarray, xs: np.ndarray, rng: np.random.Generator,
           bank: list[np.ndarray], strength: tuple[float, float], pad: int = _PAD) -> None:
    """Stamp a random kernel of ``bank``, scaled by a draw from ``strength``, at each level-0
    position into ``canvas`` (padded by ``pad``), keeping the maximum."""
    for y, x, k, s in zip(ys, xs, rng.integers(0, len(bank), len(ys)),
                          rng.uniform(*strength, len(ys))):
        stamp = bank[k]
        sz = stamp.shape[0]
        y0, x0 = y - sz // 2 + pad, x - sz // 2 + pad
        view = canvas[y0:y0 + sz, x0:x0 + sz]
        np.maximum(view, stamp * s, out=view)


def _block_mean(mask: np.ndarray, cell: int, lo: tuple[int, int]) -> np.ndarray:
    """Mean of a level-0 mask over each ``cell`` x ``cell`` block of the low-resolution grid."""
    return mask[: lo[0] * cell, : lo[1] * cell].reshape(lo[0], cell, lo[1], cell).mean((1, 3))


def _slide_stain(rng: np.random.Generator, centre: int) -> tuple[list, float, float, float]:
    """Stain vectors, hematoxylin and eosin strengths and light of one slide: its centre's
    values jittered (protocol drift between batches, section thickness, scanner lamp)."""
    c = CENTRES[centre]
    stains = [np.abs(np.asarray(v) + rng.normal(0, 0.02, 3)) for v in c["stains"]]
    h = c["h"] * float(np.exp(rng.normal(0, 0.1)))
    e = c["e"] * float(np.exp(rng.normal(0, 0.12)))
    io = float(np.clip(c["io"] + rng.normal(0, 4), 205, 255))
    return stains, h, e, io


def _resize(field: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear float32 resize of a low-resolution field to ``shape`` (fast, pixel centres)."""
    img = Image.fromarray(np.ascontiguousarray(field, np.float32), mode="F")
    return np.asarray(img.resize((shape[1], shape[0]), Image.BILINEAR))


def render_slide(rng: np.random.Generator, spec: DemoSpec, tumour: bool, centre: int
                 ) -> tuple[np.ndarray, dict[str, list[np.ndarray]]]:
    """Render one slide: (H, W, 3) uint8 RGB at level 0 and its polygons by ASAP group.

    Tumour slides carry metastases over most of their tissue (``coverage`` 0.7-0.9).
    """
    cell = 16
    lo = (spec.height // cell, spec.width // cell)
    shape = (spec.height, spec.width)
    tissue_lo = _tissue(rng, lo)
    polys, holes = (_tumour_polygons(rng, tissue_lo, cell, rng.uniform(0.7, 0.9), 16.0)
                    if tumour else ([], []))
    tissue = _resize(tissue_lo, shape) > 0
    # Same rule as label reading: inside any tumour polygon and outside every exclusion.
    tum = _rasterise(polys, shape) & ~_rasterise(holes, shape) & tissue
    tum_lo = _block_mean(tum, cell, lo) > 0.5
    tis_lo = _block_mean(tissue, cell, lo) > 0.5
    normal_lo = tis_lo & ~tum_lo

    # Lymph-node compartments (low resolution, in order of precedence): fibrous capsule at the
    # tissue edge and trabeculae, follicles (germinal centre in a mantle of small lymphocytes),
    # sinuses, lymphoid sheets.
    fibrous = normal_lo & ((tissue_lo < rng.uniform(0.03, 0.06))
                           | (np.abs(_smooth_noise(rng, lo, 8)) < rng.uniform(0.02, 0.06)))
    follicle = _smooth_noise(rng, lo, 5)
    gc_level = rng.uniform(0.7, 1.3)
    gc = normal_lo & ~fibrous & (follicle > gc_level)
    mantle = normal_lo & ~fibrous & ~gc & (follicle > gc_level - 0.4)
    sinus = normal_lo & ~fibrous & ~gc & ~mantle & (
        np.abs(_smooth_noise(rng, lo, 4)) < rng.uniform(0.05, 0.15))
    sheet = normal_lo & ~fibrous & ~gc & ~mantle & ~sinus
    # Metastasis: sheets of tumour cells cut by desmoplastic stroma, with gland lumens in some
    # slides and a lymphocytic infiltrate of varying strength.
    desmo = tum_lo & (np.abs(_smooth_noise(rng, lo, 5)) < rng.uniform(0.005, 0.03))
    lumen = tum_lo & ~desmo & (_smooth_noise(rng, lo, 1.5) > rng.uniform(1.5, 4.0))
    nest = tum_lo & ~desmo & ~lumen

    hema = np.zeros((shape[0] + 2 * _PAD, shape[1] + 2 * _PAD), np.float32)
    cyto = np.zeros_like(hema)  # eosin of macrophage and histiocyte cytoplasm
    lymph_r = rng.uniform(5.5, 7.0)  # level-0 px (0.5 um): 5.5-7 um diameter lymphocytes
    dens_l = rng.uniform(0.0055, 0.0075) * (6.0 / lymph_r) ** 2
    clump = np.exp(0.3 * _smooth_noise(rng, lo, 2))
    lymph = dens_l * clump * (sheet + 1.15 * mantle + 0.25 * gc + 0.12 * sinus + 0.05 * fibrous)
    infiltrate = rng.uniform(0.02, 0.25)
    lymph = lymph + dens_l * infiltrate * np.exp(0.8 * _smooth_noise(rng, lo, 3)) * nest
    _stamp(hema, *_place(rng, lymph, cell), rng, _stamp_bank(rng, lymph_r, 0.15, False),
           (0.85, 1.25))
    # Germinal centres: centroblasts (large, pale, vesicular) and tingible-body macrophages
    # (pale nucleus, pink cytoplasm, engulfed dark apoptotic debris).
    cb_r = lymph_r * rng.uniform(1.3, 1.55)
    _stamp(hema, *_place(rng, gc * 0.7 / (np.pi * (1.25 * cb_r) ** 2), cell), rng,
           _stamp_bank(rng, cb_r, 0.3, True), (0.55, 0.85))
    ys, xs = _place(rng, gc * 0.00012, cell)
    _stamp(cyto, ys, xs, rng, _stamp_bank(rng, lymph_r * 3.2, 0.3, False, n=12), (0.2, 0.35))
    _stamp(hema, ys, xs, rng, _stamp_bank(rng, lymph_r * 1.3, 0.4, True, n=12), (0.5, 0.8))
    _stamp(hema, *_place(rng, gc * 0.0004, cell), rng,
           _stamp_bank(rng, lymph_r * 0.45, 0.3, False, n=12), (0.9, 1.3))
    # Sinus histiocytes: oval pale nuclei in pink cytoplasm.
    ys, xs = _place(rng, sinus * 0.0005, cell)
    _stamp(cyto, ys, xs, rng, _stamp_bank(rng, lymph_r * 2.6, 0.4, False, n=12), (0.2, 0.35))
    _stamp(hema, ys, xs, rng, _stamp_bank(rng, lymph_r * 1.3, 0.7, True, n=12), (0.5, 0.8))
    # Fibroblasts: dark spindles in the capsule, trabeculae and desmoplastic stroma.
    _stamp(hema, *_place(rng, (fibrous | desmo) * 0.0004, cell), rng,
           _stamp_bank(rng, lymph_r * 0.9, 1.6, False, n=24), (0.8, 1.1))
    if tumour:  # crowded large irregular vesicular nuclei with nucleoli
        tum_r = lymph_r * rng.uniform(1.9, 2.5)
        _stamp(hema, *_place(rng, nest * rng.uniform(0.9, 1.2) / (np.pi * (1.45 * tum_r) ** 2),
                             cell), rng, _stamp_bank(rng, tum_r, 0.45, True), (0.75, 1.1))
    hema = hema[_PAD:-_PAD, _PAD:-_PAD]
    cyto = cyto[_PAD:-_PAD, _PAD:-_PAD]

    # Extracellular eosin: pale in lymphoid tissue, dense fibres in the capsule and stroma, and
    # the tumour cells' abundant pink cytoplasm.
    e_base = np.select([fibrous | desmo, gc, sinus, mantle, sheet, nest],
                       [rng.uniform(0.55, 0.75), 0.26, 0.12, 0.12, rng.uniform(0.12, 0.2),
                        rng.uniform(0.26, 0.36)], 0.0).astype(np.float32)
    e_fibre = e_base * np.where(fibrous | desmo, 0.45, 0.08).astype(np.float32)
    fibres = ndimage.rotate(_smooth_noise(rng, (shape[0] // 4, shape[1] // 4), (0.8, 3.0)),
                            rng.uniform(0, 180), reshape=False, order=1, mode="grid-wrap")
    fibres = _resize(fibres, shape)
    eosin = (_resize(e_base, shape) + _resize(e_fibre, shape) * fibres) * tissue
    eosin = np.clip(eosin, 0, None) + cyto
    hema = hema * 0.95 + np.float32(0.04) * tissue

    # Staining: the slide's stains; section thickness and the uptake of each stain varying
    # over the slide (patch to patch); focus.
    stains, h, e, io = _slide_stain(rng, centre)
    thick = _smooth_noise(rng, lo, 12)
    uptake = STAIN_VARIATION * _smooth_noise(rng, lo, 5), STAIN_VARIATION * _smooth_noise(rng, lo, 5)
    hema = ndimage.gaussian_filter(hema * _resize(np.exp(0.15 * thick + uptake[0]), shape),
                                   SLIDE_FOCUS[centre] * rng.uniform(0.75, 1.3))
    eosin *= _resize(np.exp(0.15 * thick + uptake[1]), shape)
    unit = np.stack([_unit(v) for v in stains]).astype(np.float32)
    noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.012)
    rgb = np.empty(shape + (3,), np.uint8)
    for ch in range(3):  # Beer-Lambert, one channel at a time (memory, speed)
        od = hema * np.float32(h * unit[0, ch]) + eosin * np.float32(e * unit[1, ch]) + noise
        rgb[..., ch] = np.clip(np.float32(io) * np.exp(-np.clip(od, 0, None)), 0, 255)
    return rgb, {"_0": polys, "_2": holes}


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
    """Slide names, labels, centres and splits.

    Training slides follow Camelyon16's naming: each label's slides are numbered through the
    centres of ``SLIDE_TRAIN_CENTRES`` in turn, centre 0 first (``centre_split`` in config holds
    the last number of centre 0). Test slides cycle through ``SLIDE_TEST_CENTRES`` and through
    the labels normal, tumour, tumour: tumour slides are only partly tumour, so twice as many
    keep the test patches about balanced.
    """
    rows = []
    per_label = spec.n_train // 2
    n_c = len(SLIDE_TRAIN_CENTRES)
    for label in ("normal", "tumor"):
        for k in range(1, per_label + 1):
            centre = SLIDE_TRAIN_CENTRES[(k - 1) * n_c // per_label]
            rows.append({"slide": f"{label}_{k:03d}", "label": label, "centre": centre,
                         "split": "train"})
    for k in range(1, spec.n_test + 1):
        rows.append({"slide": f"test_{k:03d}", "label": "normal" if k % 3 == 1 else "tumor",
                     "centre": SLIDE_TEST_CENTRES[(k - 1) % len(SLIDE_TEST_CENTRES)],
                     "split": "test"})
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


# Pre-tiled patch demo: PathMNIST-like tissue classes rendered with the same stamps, scatter and
# Beer-Lambert staining as the slides, then area-averaged to MedMNIST's 28 px.

PATCH_CLASSES = ("adipose", "debris", "lymphocytes", "mucus", "stroma", "tumour")
_CELL = 4  # px per cell of the nuclear density maps
_MARGIN = 12  # px rendered beyond the patch on each side (> the largest nucleus radius)


@dataclass(frozen=True)
class PatchDemoSpec:
    """Size and content of the pre-tiled patch demo (a MedMNIST-layout ``.npz``).

    Each patch covers ``field_um`` µm (as NCT-CRC-HE-100K's 224 px at 0.5 µm, which PathMNIST
    shrinks to 28 px), is rendered at ``render`` px and area-averaged to ``size`` px. Train and
    val mix the stain centres ``train_centres``; test mixes ``test_centres`` (one unseen).
    """

    n_train: int = 800  # patches per class
    n_val: int = 100
    n_test: int = 200
    size: int = 28
    render: int = 84  # a multiple of size
    field_um: float = 112.0
    classes: tuple[str, ...] = PATCH_CLASSES
    train_centres: tuple[int, ...] = (0, 1)
    test_centres: tuple[int, ...] = (0, 1, 2)
    mix: float = 0.45  # chance that a patch also holds a region of a neighbouring tissue
    seed: int = 0

    def __post_init__(self) -> None:
        if self.render % self.size:
            raise ValueError(f"render ({self.render}) must be a multiple of size ({self.size})")
        unknown = set(self.classes) - set(PATCH_CLASSES)
        if unknown:
            raise ValueError(f"unknown patch classes {sorted(unknown)}; "
                             f"choose from {PATCH_CLASSES}")


def _nuclei(rng: np.random.Generator, n: int, um: float, density: float | np.ndarray,
            radius: float, irregular: float, vesicular: bool, strength: tuple[float, float]
            ) -> np.ndarray:
    """Hematoxylin (n, n) of nuclei of ``radius`` µm at ``density`` per 1000 µm² (a scalar or a
    per-cell map); each call draws a fresh small stamp bank, so shapes vary between patches."""
    bank = _stamp_bank(rng, radius / um, irregular, vesicular, n=6)
    pad = bank[0].shape[0]
    canvas = np.zeros((n + 2 * pad, n + 2 * pad), np.float32)
    per_px = np.broadcast_to(np.asarray(density) * um ** 2 / 1000, (n // _CELL, n // _CELL))
    _scatter(canvas, rng, per_px, _CELL, bank, strength)
    return canvas[pad:pad + n, pad:pad + n]


def _clumped(rng: np.random.Generator, n: int, mean: float, spread: float) -> np.ndarray:
    """Per-cell density map with mean ``mean`` and log-normal clumping of strength ``spread``."""
    return mean * np.exp(spread * _smooth_noise(rng, (n // _CELL, n // _CELL), 2) - spread ** 2 / 2)


def _fibres(rng: np.random.Generator, n: int, along: float, across: float) -> np.ndarray:
    """Unit-variance fibre texture (n, n): smooth over ``along`` px in a random direction."""
    field = _smooth_noise(rng, (n, n), (across, along))
    return ndimage.rotate(field, rng.uniform(0, 180), reshape=False, order=1, mode="grid-wrap")


def _blobs(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """Unit-variance noise (n, n) smooth over ``sigma`` px, made at cell resolution (cheap)."""
    return _upsample(_smooth_noise(rng, (n // _CELL, n // _CELL), sigma / _CELL), (n, n))


def _region(rng: np.random.Generator, n: int, fraction: float, sigma: float) -> np.ndarray:
    """Soft mask (n, n) of smooth blobs covering about ``fraction`` of the field."""
    field = _blobs(rng, n, sigma)
    edge = (field - np.quantile(field, 1 - fraction)) / 0.3 + 0.5
    return np.clip(edge, 0, 1).astype(np.float32)


def _cells(mask: np.ndarray) -> np.ndarray:
    """Mean of a (n, n) mask over each density-map cell."""
    g = mask.shape[0] // _CELL
    return mask.reshape(g, _CELL, g, _CELL).mean((1, 3))


def _adipose(rng: np.random.Generator, n: int, um: float) -> tuple[np.ndarray, np.ndarray]:
    """Fat: large empty polygonal cells with thin, sometimes torn membranes, rare flat nuclei."""
    d = rng.uniform(45, 95) / um  # adipocyte diameter, px
    grid = np.arange(-d, n + d, d)
    seeds = np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2)
    seeds = (seeds + rng.uniform(-0.35, 0.35, seeds.shape) * d).astype(np.float32)
    axis = np.arange(n, dtype=np.float32)[:, None]
    d2 = ((axis - seeds[:, 0]) ** 2)[:, None, :] + ((axis - seeds[:, 1]) ** 2)[None, :, :]
    two = np.sqrt(np.partition(d2, 1, axis=-1)[..., :2])
    gap = two[..., 1] - two[..., 0]  # about twice the distance to a cell border
    membrane = np.exp(-(gap / (rng.uniform(1.0, 2.5) / um)) ** 2)
    membrane *= np.clip(_blobs(rng, n, 4) + 1.8, 0, 1)  # tears
    eosin = rng.uniform(0.3, 0.6) * membrane + rng.uniform(0.0, 0.04)
    hema = _nuclei(rng, n, um, 3.0 * _cells(membrane), 2.4, 1.2, False, (0.6, 1.0))
    return hema + 0.02, eosin


def _debris(rng: np.random.Generator, n: int, um: float) -> tuple[np.ndarray, np.ndarray]:
    """Necrosis: clumped nuclear dust and pyknotic nuclei in pale blotchy eosin, a blue smear."""
    dust = _nuclei(rng, n, um, _clumped(rng, n, rng.uniform(8, 30), 0.8), 1.2, 0.6, False,
                   (0.3, 1.0))
    pyknotic = _nuclei(rng, n, um, _clumped(rng, n, rng.uniform(0.5, 5), 0.6), 2.6, 0.3, False,
                       (0.7, 1.2))
    smear = rng.uniform(0.03, 0.12) * np.clip(1 + 0.5 * _blobs(rng, n, 8), 0, None)
    eosin = rng.uniform(0.2, 0.45) * np.clip(1 + 0.45 * _blobs(rng, n, 5), 0.05, None)
    return np.maximum(dust, pyknotic) + smear, eosin


def _lymphocytes(rng: np.random.Generator, n: int, um: float) -> tuple[np.ndarray, np.ndarray]:
    """Lymphoid tissue: sheets of small dark round nuclei, sometimes with paler, larger blasts."""
    hema = _nuclei(rng, n, um, _clumped(rng, n, rng.uniform(10, 25), 0.35),
                   3.2 * rng.uniform(0.85, 1.15), 0.15, False, (0.85, 1.25))
    if rng.random() < 0.3:  # germinal-centre blasts
        blasts = _nuclei(rng, n, um, rng.uniform(0.5, 2.0), 4.8, 0.3, True, (0.6, 0.9))
        hema = np.maximum(hema, blasts)
    eosin = rng.uniform(0.12, 0.3) * np.clip(1 + 0.3 * _fibres(rng, n, 4, 1), 0, None)
    return hema + 0.04, eosin


def _mucus(rng: np.random.Generator, n: int, um: float) -> tuple[np.ndarray, np.ndarray]:
    """Mucin pools: pale bluish-pink lakes of streaming, lacy strands, very few floating cells."""
    strands = 0.4 + np.exp(-(_fibres(rng, n, rng.uniform(3, 8), rng.uniform(1.5, 3)) / 0.4) ** 2)
    cells = _nuclei(rng, n, um, rng.uniform(0.05, 0.4), 3.5, 0.3, False, (0.5, 0.9))
    return rng.uniform(0.05, 0.14) * strands + cells, rng.uniform(0.04, 0.14) * strands


def _stroma(rng: np.random.Generator, n: int, um: float) -> tuple[np.ndarray, np.ndarray]:
    """Collagenous stroma to smooth muscle: eosin fibres (with clefts), sparse spindle nuclei."""
    muscle = rng.random()  # 0: loose collagen with clefts, 1: dense, even muscle bundles
    fibres = _fibres(rng, n, rng.uniform(4, 10), rng.uniform(0.7, 1.2))
    clefts = np.clip((fibres + 1.2 + muscle) / 0.6, 0.15, 1)
    texture = 1 + (0.45 - 0.3 * muscle) * fibres
    eosin = rng.uniform(0.4, 0.6) * (1 + 0.4 * muscle) * np.clip(texture, 0, None) * clefts
    hema = _nuclei(rng, n, um, rng.uniform(0.5, 2.0) * (1 + 2 * muscle), 2.4, 1.4, False,
                   (0.7, 1.1))
    return hema + 0.03, eosin


def _tumour(rng: np.random.Generator, n: int, um: float) -> tuple[np.ndarray, np.ndarray]:
    """Adenocarcinoma: crowded large vesicular pleomorphic nuclei in pink cytoplasm, gland
    lumens and a few infiltrating lymphocytes."""
    lumen = _region(rng, n, rng.uniform(0.02, 0.25), rng.uniform(4, 8))
    solid = 1 - _cells(lumen)
    tumour = _nuclei(rng, n, um, _clumped(rng, n, rng.uniform(4, 8), 0.3) * solid,
                     5.5 * rng.uniform(0.8, 1.25), 0.45, True, (0.75, 1.1))
    infiltrate = _nuclei(rng, n, um, rng.uniform(0, 3) * solid, 3.2, 0.15, False, (0.9, 1.2))
    eosin = rng.uniform(0.45, 0.7) * (1 + 0.12 * _blobs(rng, n, 4)) * (1 - 0.9 * lumen)
    return np.maximum(tumour, infiltrate) + 0.06 * (1 - lumen), eosin


_TISSUES = {"adipose": _adipose, "debris": _debris, "lymphocytes": _lymphocytes,
            "mucus": _mucus, "stroma": _stroma, "tumour": _tumour}
# Tissues that may share a patch with each class (a tissue border crossing it).
_NEIGHBOURS = {"adipose": ("stroma", "mucus"), "debris": ("tumour", "lymphocytes", "mucus"),
               "lymphocytes": ("tumour", "stroma", "debris"),
               "mucus": ("tumour", "debris", "adipose"),
               "stroma": ("tumour", "adipose", "lymphocytes"),
               "tumour": ("stroma", "lymphocytes", "debris", "mucus")}


def render_patch(rng: np.random.Generator, spec: PatchDemoSpec, cls: str, centre: int
                 ) -> np.ndarray:
    """Render one (size, size, 3) uint8 patch of tissue ``cls`` stained as at ``centre``.

    The field carries a margin so that nuclei just outside still reach in; with chance
    ``spec.mix`` a neighbouring tissue covers part of it; staining strength, stain vectors,
    light and focus are jittered per patch, so a few patches cannot cover a class.
    """
    n = -(-(spec.render + 2 * _MARGIN) // _CELL) * _CELL
    um = spec.field_um / spec.render
    hema, eosin = _TISSUES[cls](rng, n, um)
    if rng.random() < spec.mix:
        h2, e2 = _TISSUES[rng.choice(_NEIGHBOURS[cls])](rng, n, um)
        w = _region(rng, n, rng.uniform(0.15, 0.5), rng.uniform(5, 10))
        hema, eosin = hema + w * (h2 - hema), eosin + w * (e2 - eosin)
    blur = rng.uniform(0.0, 1.0)
    crop = slice((n - spec.render) // 2, (n + spec.render) // 2)
    hema, eosin = (ndimage.gaussian_filter(x, blur)[crop, crop] for x in (hema, eosin))
    c = CENTRES[centre]
    gain = np.exp(rng.normal(0, 0.2, 2))
    stains = [np.asarray(v) + rng.normal(0, 0.04, 3) for v in c["stains"]]
    rgb = _beer_lambert(hema * (c["h"] * gain[0]), eosin * (c["e"] * gain[1]), stains,
                        c["io"] + rng.normal(0, 4),
                        rng.normal(0, 0.012, hema.shape + (1,)).astype(np.float32))
    f, s = spec.render // spec.size, spec.size
    small = rgb.reshape(s, f, s, f, 3).mean((1, 3))
    return np.clip(np.round(small), 0, 255).astype(np.uint8)


def make_patch_demo(out: str | os.PathLike, spec: PatchDemoSpec, progress: bool = True) -> Path:
    """Write the patch demo as a MedMNIST-layout ``.npz`` at ``out``; return ``out``.

    Keys ``{train,val,test}_images`` (N, size, size, 3) uint8 and ``{split}_labels`` (N, 1)
    uint8 (classes in turn), plus ``class_names``. Patch ``i`` of split ``k`` (SPLITS order)
    comes from ``default_rng([seed, k, i])``, so any patch can be re-rendered on its own.
    """
    out = Path(out)
    counts = {"train": spec.n_train, "val": spec.n_val, "test": spec.n_test}
    arrays = {"class_names": np.array(spec.classes)}
    n_classes = len(spec.classes)
    total = n_classes * sum(counts.values())
    with tqdm(total=total, desc="patch demo", disable=not progress) as bar:
        for k, split in enumerate(SPLITS):
            centres = spec.test_centres if split == "test" else spec.train_centres
            labels = np.arange(n_classes * counts[split]) % n_classes
            images = np.empty((len(labels), spec.size, spec.size, 3), np.uint8)
            for i, label in enumerate(labels):
                rng = np.random.default_rng([spec.seed, k, i])
                images[i] = render_patch(rng, spec, spec.classes[label],
                                         centres[rng.integers(len(centres))])
                bar.update()
            arrays[f"{split}_images"] = images
            arrays[f"{split}_labels"] = labels[:, None].astype(np.uint8)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    return out
