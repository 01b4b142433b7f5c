"""Deterministic synthetic pre-tiled patch set: PathMNIST-like tissue classes (adipose, debris,
lymphocytes, mucus, stroma, tumour) rendered with the same nucleus stamps, scatter and
Beer-Lambert staining as the demo slides (:mod:`histodistill.synth.tissue`), then area-averaged
to MedMNIST's 28 px and written in MedMNIST's npz layout."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from histodistill.data.store import SPLITS
from histodistill.io import atomic_path
from histodistill.synth.tissue import (CENTRES, beer_lambert, scatter, smooth_noise, stamp_bank,
                                       upsample)

PATCH_CLASSES = ("adipose", "debris", "lymphocytes", "mucus", "stroma", "tumour")
_CELL = 4  # px per cell of the nuclear density maps
_MARGIN = 12  # px rendered beyond the patch on each side (> the largest nucleus radius)


@dataclass(frozen=True)
class PatchDemoSpec:
    """Size and content of the pre-tiled patch demo (a MedMNIST-layout ``.npz``): the counts, mix
    and seed are the config section ``demo_patches`` (defaults: the schema's); the rest is the
    product's fixed form.

    Each patch covers ``field_um`` µm (as NCT-CRC-HE-100K's 224 px at 0.5 µm, which PathMNIST
    shrinks to 28 px), is rendered at ``render`` px and area-averaged to ``size`` px. Train and
    val mix the stain centres ``train_centres``; test mixes ``test_centres`` (one unseen).
    """

    n_train: int  # patches per class
    n_val: int
    n_test: int
    mix: float  # chance that a patch also holds a region of a neighbouring tissue
    seed: int
    # fixed properties of the product, not settings
    size: int = 28
    render: int = 84  # a multiple of size
    field_um: float = 112.0
    classes: tuple[str, ...] = PATCH_CLASSES
    train_centres: tuple[int, ...] = (0, 1)
    test_centres: tuple[int, ...] = (0, 1, 2)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], **fixed: Any) -> "PatchDemoSpec":
        """From the validated ``demo_patches`` section (every key present); ``fixed`` replaces
        fixed properties (tests: fewer classes)."""
        settings = ("n_train", "n_val", "n_test", "mix", "seed")
        return cls(**{k: cfg[k] for k in settings}, **fixed)

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
    bank = stamp_bank(rng, radius / um, irregular, vesicular, n=6)
    pad = bank[0].shape[0]
    canvas = np.zeros((n + 2 * pad, n + 2 * pad), np.float32)
    per_px = np.broadcast_to(np.asarray(density) * um ** 2 / 1000, (n // _CELL, n // _CELL))
    scatter(canvas, rng, per_px, _CELL, bank, strength)
    return canvas[pad:pad + n, pad:pad + n]


def _clumped(rng: np.random.Generator, n: int, mean: float, spread: float) -> np.ndarray:
    """Per-cell density map with mean ``mean`` and log-normal clumping of strength ``spread``."""
    return mean * np.exp(spread * smooth_noise(rng, (n // _CELL, n // _CELL), 2) - spread ** 2 / 2)


def _fibres(rng: np.random.Generator, n: int, along: float, across: float) -> np.ndarray:
    """Unit-variance fibre texture (n, n): smooth over ``along`` px in a random direction."""
    field = smooth_noise(rng, (n, n), (across, along))
    return ndimage.rotate(field, rng.uniform(0, 180), reshape=False, order=1, mode="grid-wrap")


def _blobs(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """Unit-variance noise (n, n) smooth over ``sigma`` px, made at cell resolution (cheap)."""
    return upsample(smooth_noise(rng, (n // _CELL, n // _CELL), sigma / _CELL), (n, n))


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
    rgb = beer_lambert(hema * (c["h"] * gain[0]), eosin * (c["e"] * gain[1]), stains,
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
    arrays: dict[str, Any] = {"class_names": np.array(spec.classes)}
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
