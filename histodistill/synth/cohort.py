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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from matplotlib.path import Path as MplPath
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import measure
from tqdm import tqdm

from histodistill.io import atomic_path
from histodistill.slides.annotations import write_asap_xml
from histodistill.synth.tissue import (CENTRES, PAD, smooth_noise,
                                       stamp_at, stamp_bank, unit_vector)

# Demo slides: the training split mixes centres 0-4 (centre 0 first, as Radboud UMC in
# Camelyon16); the test split mixes centres 1-4, so the two mixes differ.
SLIDE_TRAIN_CENTRES = (0, 1, 2, 3, 4)
SLIDE_TEST_CENTRES = (1, 2, 3, 4)
STAIN_VARIATION = 0.25  # log-sd of each stain's uptake from patch to patch within a slide
# Scanner focus of each centre: Gaussian blur sigma in level-0 px (centre 3 is the oldest).
SLIDE_FOCUS = (0.6, 0.9, 0.4, 1.5, 1.0)


@dataclass(frozen=True)
class DemoSpec:
    """Size and content of the demo cohort: the config section ``demo`` (defaults: the
    schema's)."""

    n_train: int  # half normal, half tumour
    n_test: int  # one normal slide to two tumour slides, so test patches are about balanced
    width: int  # level-0 pixels
    height: int
    mpp: float  # level 0 is 20x by the 10/mpp convention at 0.5
    levels: int  # downsample 2 between levels
    seed: int
    jpeg_quality: int

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "DemoSpec":
        """From the validated ``demo`` section (every key present)."""
        return cls(**{f.name: cfg[f.name] for f in fields(cls)})


def _tissue(rng: np.random.Generator, lo: tuple[int, int]) -> np.ndarray:
    """Low-resolution tissue field (> 0 is tissue): lumpy ellipse with ragged edges and holes."""
    h, w = lo
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = h * rng.uniform(0.42, 0.58), w * rng.uniform(0.42, 0.58)
    ry, rx = h * rng.uniform(0.30, 0.40), w * rng.uniform(0.30, 0.40)
    envelope = 1.0 - np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return envelope + 0.25 * smooth_noise(rng, lo, 6) + 0.08 * smooth_noise(rng, lo, 2)


def _tumour_polygons(rng: np.random.Generator, tissue_lo: np.ndarray, cell: int,
                     coverage: float, sigma: float
                     ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Irregular tumour polygons (level-0 x, y) covering about ``coverage`` of the tissue, with
    blobs about ``sigma`` low-resolution cells across.

    Returns ``(tumour, exclusion)``: contours nested an odd number of times are holes, written
    as Camelyon16 exclusion polygons (group ``_2``).
    """
    field = smooth_noise(rng, tissue_lo.shape, sigma)
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


def _rasterise(polys: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) mask of the polygons' interiors (vertices as level-0 x, y)."""
    img = Image.new("1", (shape[1], shape[0]), 0)
    canvas = ImageDraw.Draw(img)
    for poly in polys:
        canvas.polygon([tuple(p) for p in poly.tolist()], fill=1)
    return np.array(img, bool)


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
    return np.asarray(img.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


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
                           | (np.abs(smooth_noise(rng, lo, 8)) < rng.uniform(0.02, 0.06)))
    follicle = smooth_noise(rng, lo, 5)
    gc_level = rng.uniform(0.7, 1.3)
    gc = normal_lo & ~fibrous & (follicle > gc_level)
    mantle = normal_lo & ~fibrous & ~gc & (follicle > gc_level - 0.4)
    sinus = normal_lo & ~fibrous & ~gc & ~mantle & (
        np.abs(smooth_noise(rng, lo, 4)) < rng.uniform(0.05, 0.15))
    sheet = normal_lo & ~fibrous & ~gc & ~mantle & ~sinus
    # Metastasis: sheets of tumour cells cut by desmoplastic stroma, with gland lumens in some
    # slides and a lymphocytic infiltrate of varying strength.
    desmo = tum_lo & (np.abs(smooth_noise(rng, lo, 5)) < rng.uniform(0.005, 0.03))
    lumen = tum_lo & ~desmo & (smooth_noise(rng, lo, 1.5) > rng.uniform(1.5, 4.0))
    nest = tum_lo & ~desmo & ~lumen

    hema = np.zeros((shape[0] + 2 * PAD, shape[1] + 2 * PAD), np.float32)
    cyto = np.zeros_like(hema)  # eosin of macrophage and histiocyte cytoplasm
    lymph_r = rng.uniform(5.5, 7.0)  # level-0 px (0.5 um): 5.5-7 um diameter lymphocytes
    dens_l = rng.uniform(0.0055, 0.0075) * (6.0 / lymph_r) ** 2
    clump = np.exp(0.3 * smooth_noise(rng, lo, 2))
    lymph = dens_l * clump * (sheet + 1.15 * mantle + 0.25 * gc + 0.12 * sinus + 0.05 * fibrous)
    infiltrate = rng.uniform(0.02, 0.25)
    lymph = lymph + dens_l * infiltrate * np.exp(0.8 * smooth_noise(rng, lo, 3)) * nest
    stamp_at(hema, *_place(rng, lymph, cell), rng, stamp_bank(rng, lymph_r, 0.15, False),
           (0.85, 1.25))
    # Germinal centres: centroblasts (large, pale, vesicular) and tingible-body macrophages
    # (pale nucleus, pink cytoplasm, engulfed dark apoptotic debris).
    cb_r = lymph_r * rng.uniform(1.3, 1.55)
    stamp_at(hema, *_place(rng, gc * 0.7 / (np.pi * (1.25 * cb_r) ** 2), cell), rng,
           stamp_bank(rng, cb_r, 0.3, True), (0.55, 0.85))
    ys, xs = _place(rng, gc * 0.00012, cell)
    stamp_at(cyto, ys, xs, rng, stamp_bank(rng, lymph_r * 3.2, 0.3, False, n=12), (0.2, 0.35))
    stamp_at(hema, ys, xs, rng, stamp_bank(rng, lymph_r * 1.3, 0.4, True, n=12), (0.5, 0.8))
    stamp_at(hema, *_place(rng, gc * 0.0004, cell), rng,
           stamp_bank(rng, lymph_r * 0.45, 0.3, False, n=12), (0.9, 1.3))
    # Sinus histiocytes: oval pale nuclei in pink cytoplasm.
    ys, xs = _place(rng, sinus * 0.0005, cell)
    stamp_at(cyto, ys, xs, rng, stamp_bank(rng, lymph_r * 2.6, 0.4, False, n=12), (0.2, 0.35))
    stamp_at(hema, ys, xs, rng, stamp_bank(rng, lymph_r * 1.3, 0.7, True, n=12), (0.5, 0.8))
    # Fibroblasts: dark spindles in the capsule, trabeculae and desmoplastic stroma.
    stamp_at(hema, *_place(rng, (fibrous | desmo) * 0.0004, cell), rng,
           stamp_bank(rng, lymph_r * 0.9, 1.6, False, n=24), (0.8, 1.1))
    if tumour:  # crowded large irregular vesicular nuclei with nucleoli
        tum_r = lymph_r * rng.uniform(1.9, 2.5)
        stamp_at(hema, *_place(rng, nest * rng.uniform(0.9, 1.2) / (np.pi * (1.45 * tum_r) ** 2),
                             cell), rng, stamp_bank(rng, tum_r, 0.45, True), (0.75, 1.1))
    hema = hema[PAD:-PAD, PAD:-PAD]
    cyto = cyto[PAD:-PAD, PAD:-PAD]

    # Extracellular eosin: pale in lymphoid tissue, dense fibres in the capsule and stroma, and
    # the tumour cells' abundant pink cytoplasm.
    e_base = np.select([fibrous | desmo, gc, sinus, mantle, sheet, nest],
                       [rng.uniform(0.55, 0.75), 0.26, 0.12, 0.12, rng.uniform(0.12, 0.2),
                        rng.uniform(0.26, 0.36)], 0.0).astype(np.float32)
    e_fibre = e_base * np.where(fibrous | desmo, 0.45, 0.08).astype(np.float32)
    fibres = ndimage.rotate(smooth_noise(rng, (shape[0] // 4, shape[1] // 4), (0.8, 3.0)),
                            rng.uniform(0, 180), reshape=False, order=1, mode="grid-wrap")
    fibres = _resize(fibres, shape)
    eosin = (_resize(e_base, shape) + _resize(e_fibre, shape) * fibres) * tissue
    eosin = np.clip(eosin, 0, None) + cyto
    hema = (hema * 0.95 + np.float32(0.04) * tissue).astype(np.float32, copy=False)

    # Staining: the slide's stains; section thickness and the uptake of each stain varying
    # over the slide (patch to patch); focus.
    stains, h, e, io = _slide_stain(rng, centre)
    thick = smooth_noise(rng, lo, 12)
    uptake = STAIN_VARIATION * smooth_noise(rng, lo, 5), STAIN_VARIATION * smooth_noise(rng, lo, 5)
    hema = ndimage.gaussian_filter(hema * _resize(np.exp(0.15 * thick + uptake[0]), shape),
                                   SLIDE_FOCUS[centre] * rng.uniform(0.75, 1.3))
    eosin *= _resize(np.exp(0.15 * thick + uptake[1]), shape)
    unit = np.stack([unit_vector(v) for v in stains]).astype(np.float32)
    noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.012)
    rgb = np.empty(shape + (3,), np.uint8)
    for ch in range(3):  # Beer-Lambert, one channel at a time (memory, speed)
        od = hema * np.float32(h * unit[0, ch]) + eosin * np.float32(e * unit[1, ch]) + noise
        rgb[..., ch] = np.clip(np.float32(io) * np.exp(-np.clip(od, 0, None)), 0, 255)
    return rgb, {"_0": polys, "_2": holes}


def write_pyramid(path: str | os.PathLike, rgb: np.ndarray, mpp: float, levels: int, *,
                  quality: int, tile: int = 256) -> None:
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
            write_pyramid(img_dir / f"{row['slide']}.tif", rgb, spec.mpp, spec.levels,
                          quality=spec.jpeg_quality)
            if polys["_0"]:
                write_asap_xml(ann_dir / f"{row['slide']}.xml", polys)
        with open(tmp / "testing/reference.csv", "w", newline="") as f:
            writer = csv.writer(f)
            for row in rows:
                if row["split"] == "test":
                    writer.writerow([row["slide"], row["label"].capitalize()])
        with open(tmp / "slides.csv", "w", newline="") as f:
            table = csv.DictWriter(f, fieldnames=["slide", "label", "centre", "split"])
            table.writeheader()
            table.writerows(rows)
    return out
