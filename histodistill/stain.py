"""Macenko stain templates and a differentiable Macenko normaliser in torch.

Macenko et al. (2009): optical density ``OD = -log((I + 1) / Io)``; keep pixels whose OD exceeds
``beta`` in every channel; project them onto the plane of the two largest eigenvectors of their
covariance; the stain vectors are the directions at the ``alpha`` and ``100 - alpha`` angle
percentiles; concentrations are the least-squares solution and are rescaled so their 99th
percentile matches the template's. Everything is batched matrix algebra, so gradients flow to the
input (used as a stain-aware augmentation during distillation).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from histodistill.io import InputError, atomic_path, read_json, write_json
from histodistill.data.store import PatchStore

IO = 240.0  # transmitted light intensity (0-255 scale), as in Macenko's reference code
BETA = 0.15
ALPHA = 1.0


@dataclass
class StainTemplate:
    """A template's stain matrix (rows: hematoxylin, eosin; unit OD vectors) and the 99th
    percentile of its concentrations, with the parameters that produced them."""

    stain_matrix: list[list[float]]
    max_concentrations: list[float]
    io: float = IO
    alpha: float = ALPHA
    beta: float = BETA
    # the concentration percentile over unclipped pixels only (max_concentrations); False: over
    # every pixel, as Macenko's reference
    ignore_clipped: bool = True
    index: int = -1  # row of the template patch in the patch store
    slide: str = ""
    coords: tuple[int, int] = (-1, -1)

    def save(self, path: str | os.PathLike, **extra: object) -> None:
        """Write the template as JSON (atomically), with any extra provenance fields."""
        write_json(path, {**asdict(self), **extra})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "StainTemplate":
        data = read_json(path, "stain_template")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def _to_od(x: torch.Tensor, io: float) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> optical density (B, H*W, 3)."""
    b = x.shape[0]
    return -torch.log((x.reshape(b, 3, -1).transpose(1, 2) * 255.0 + 1.0) / io)


def stain_vectors(x: torch.Tensor, *, io: float, alpha: float, beta: float,
                  min_pixels: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Macenko stain matrices (B, 2, 3) of a batch (B, 3, H, W) in [0, 1], differentiably.

    Also returns a boolean (B,) telling which images had at least ``min_pixels`` stained pixels
    and two distinct stain directions (the others pass through :class:`MacenkoNormaliser`). When the two largest
    eigenvalues nearly coincide, the eigenvector gradient (which scales with 1/gap) is cut.
    """
    od = _to_od(x, io)
    mask = (od > beta).all(-1)  # (B, N)
    w = mask.to(od.dtype)
    count = w.sum(1)
    valid = count >= min_pixels
    n = count.clamp_min(2.0)[:, None]
    mean = (od * w[..., None]).sum(1) / n
    centred = (od - mean[:, None]) * w[..., None]
    cov = centred.transpose(1, 2) @ centred / (n[..., None] - 1)
    eye = torch.eye(3, dtype=od.dtype, device=od.device)
    finite = torch.isfinite(cov).all(-1).all(-1)
    valid = valid & finite
    cov = torch.where(valid[:, None, None], cov, eye) + eye * 1e-9  # keep eigh well posed
    evals, evecs = torch.linalg.eigh(cov)
    gap = (evals[:, 1] - evals[:, 0]) / evals[:, 2].abs().clamp_min(1e-12)
    evecs = torch.where((gap > 1e-6)[:, None, None], evecs, evecs.detach())
    plane = evecs[:, :, 1:3].flip(-1)  # columns: principal, second
    sign = torch.where(plane.sum(1, keepdim=True) < 0, -1.0, 1.0).to(od.dtype)
    plane = plane * sign  # principal axis points into positive OD so angles stay in (-pi, pi)
    proj = od @ plane  # (B, N, 2)
    phi = torch.atan2(proj[..., 1], proj[..., 0])
    # masked-out pixels are NaN for the quantile; images without enough pixels keep all angles
    # (their stains are replaced downstream) so no NaN enters the graph
    keep = mask | ~valid[:, None]
    phi = torch.where(keep, phi, torch.full_like(phi, float("nan")))
    q = torch.tensor([alpha / 100, 1 - alpha / 100], dtype=od.dtype, device=od.device)
    lo, hi = torch.nanquantile(phi, q, dim=1)  # each (B,)
    v_lo = (plane @ torch.stack([torch.cos(lo), torch.sin(lo)], -1)[..., None])[..., 0]
    v_hi = (plane @ torch.stack([torch.cos(hi), torch.sin(hi)], -1)[..., None])[..., 0]
    first_is_h = (v_lo[:, 0] > v_hi[:, 0])[:, None]  # hematoxylin has the larger red OD
    h = torch.where(first_is_h, v_lo, v_hi)
    e = torch.where(first_is_h, v_hi, v_lo)
    stains = torch.stack([h, e], 1)
    stains = stains / stains.norm(dim=-1, keepdim=True)
    # identical angles at both percentiles (uniform stained pixels) leave one stain undefined
    distinct = (stains[:, 0] * stains[:, 1]).sum(-1).abs() < 1 - 1e-6
    return stains, valid & distinct & torch.isfinite(stains).all(-1).all(-1)


def concentrations(od: torch.Tensor, stains: torch.Tensor) -> torch.Tensor:
    """Least-squares stain concentrations (B, 2, N) of OD (B, N, 3) for stain matrices (B, 2, 3)."""
    gram = stains @ stains.transpose(1, 2)  # (B, 2, 2)
    return torch.linalg.solve(gram, stains @ od.transpose(1, 2))


def max_concentrations(conc: torch.Tensor, x: torch.Tensor, *, ignore_clipped: bool,
                       min_pixels: int = 16) -> torch.Tensor:
    """99th percentile (B, 2) of each image's concentrations (B, 2, N) over its pixels of
    (B, 3, H, W) ``x`` in [0, 1]; with ``ignore_clipped`` over the pixels with no channel at 0
    or 255. A clipped pixel's optical density is its bound's, not its stain's: a distilled set
    with a few percent of them (what an image optimiser leaves at its bounds) would otherwise
    set the percentile and wash the whole image out. (Real JPEG tissue has about 1 % of its
    darkest pixels at 0 in a channel; ignoring them moves its normalisation away from Macenko's
    reference, which ``ignore_clipped=False`` reproduces.) An image with fewer than
    ``min_pixels`` unclipped pixels uses all of them."""
    if not ignore_clipped:
        return torch.quantile(conc, 0.99, dim=-1)
    b = x.shape[0]
    v = (x.reshape(b, 3, -1) * 255.0).round()
    clipped = ((v <= 0) | (v >= 255)).any(1)  # (B, N)
    enough = (~clipped).sum(1) >= min_pixels
    keep = ~clipped | ~enough[:, None]
    masked = torch.where(keep[:, None, :], conc, torch.full_like(conc, float("nan")))
    return torch.nanquantile(masked, 0.99, dim=-1)


def fit(image: np.ndarray | torch.Tensor, *, io: float, alpha: float, beta: float,
        ignore_clipped: bool) -> StainTemplate:
    """Fit a Macenko template to one image: (H, W, 3) uint8 or (3, H, W) float in [0, 1].

    Raises ``ValueError`` when the image has too few stained pixels to estimate stains.
    """
    x = _as_batch(image)
    stains, valid = stain_vectors(x, io=io, alpha=alpha, beta=beta)
    if not bool(valid[0]):
        raise ValueError("too few stained pixels (OD > beta) to fit a Macenko template")
    conc = concentrations(_to_od(x, io), stains)
    max_c = max_concentrations(conc, x, ignore_clipped=ignore_clipped)
    return StainTemplate(stains[0].tolist(), max_c[0].tolist(), io, alpha, beta, ignore_clipped)


def _as_batch(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = image if torch.is_tensor(image) else torch.from_numpy(np.array(image))
    if x.dtype == torch.uint8:
        x = x.permute(2, 0, 1).double() / 255.0 if x.shape[-1] == 3 else x.double() / 255.0
    return x.double()[None] if x.dim() == 3 else x.double()


class MacenkoNormaliser(torch.nn.Module):
    """Differentiable map of a batch (B, 3, H, W) in [0, 1] to a template's stain appearance.

    Each image's own stain matrix and 99th-percentile concentrations (over its unclipped pixels)
    are estimated
    (:func:`stain_vectors`), its concentrations rescaled to the template's maxima, and the image
    re-synthesised with the template's stain matrix. Images without enough stained pixels
    (blank background) pass through unchanged.
    """

    stains: torch.Tensor  # buffers (registered in __init__)
    max_c: torch.Tensor

    def __init__(self, template: StainTemplate) -> None:
        super().__init__()
        self.io, self.alpha, self.beta = template.io, template.alpha, template.beta
        self.ignore_clipped = template.ignore_clipped
        self.register_buffer("stains", torch.tensor(template.stain_matrix, dtype=torch.float64))
        self.register_buffer("max_c", torch.tensor(template.max_concentrations, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xd = x.double()
        b, _, h, w = xd.shape
        stains, valid = stain_vectors(xd, io=self.io, alpha=self.alpha, beta=self.beta)
        stains = torch.where(valid[:, None, None], stains, self.stains)
        od = _to_od(xd, self.io)
        conc = concentrations(od, stains)
        max_c = max_concentrations(conc, xd, ignore_clipped=self.ignore_clipped).clamp_min(1e-6)
        conc = conc * (self.max_c / max_c)[..., None]
        out = self.io * torch.exp(-(self.stains.T @ conc)) - 1.0  # exact inverse of _to_od
        out = (out / 255.0).clamp(0.0, 1.0).reshape(b, 3, h, w)
        return torch.where(valid[:, None, None, None], out, xd).to(dtype)


def normalise(images: np.ndarray, template: StainTemplate, batch: int = 64) -> np.ndarray:
    """Normalise uint8 images (N, 3, H, W) to ``template``; returns uint8 (N, 3, H, W)."""
    norm = MacenkoNormaliser(template)
    out = np.empty_like(images)
    with torch.no_grad():
        for s in range(0, len(images), batch):
            x = torch.from_numpy(images[s:s + batch]).double() / 255.0
            out[s:s + batch] = (norm(x) * 255.0).round().byte().numpy()
    return out


def choose_template(patches: Callable[[np.ndarray], np.ndarray], rows: np.ndarray,
                    chunk: int = 1024, *, io: float, alpha: float, beta: float,
                    ignore_clipped: bool) -> tuple[StainTemplate, dict[str, list[float]]]:
    """Histo-DD's template: the patch whose pixel mean and std are closest to the dataset's.

    ``patches(idx)`` returns uint8 (n, 3, H, W) for sorted rows ``idx``. Statistics are per
    channel; distance is Euclidean over (mean, std). Candidates too blank to fit (too few stained
    pixels) are passed over in order of distance. Returns the template (``index`` is its store
    row) and the dataset's and template's statistics.
    """
    means, stds = [], []
    total, total_sq, count = np.zeros(3), np.zeros(3), 0
    for s in range(0, len(rows), chunk):
        x = patches(rows[s:s + chunk]).astype(np.float64)
        means.append(x.mean((2, 3)))
        stds.append(x.std((2, 3)))
        total += x.sum((0, 2, 3))
        total_sq += (x ** 2).sum((0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    patch_mean, patch_std = np.concatenate(means), np.concatenate(stds)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0))
    dist = np.linalg.norm(np.concatenate([patch_mean - mean, patch_std - std], 1), axis=1)
    for k in np.argsort(dist, kind="stable"):
        try:
            template = fit(patches(rows[k:k + 1])[0].transpose(1, 2, 0), io=io, alpha=alpha,
                           beta=beta, ignore_clipped=ignore_clipped)
        except ValueError:
            continue
        template.index = int(rows[k])
        return template, {"dataset_mean": mean.tolist(), "dataset_std": std.tolist(),
                          "template_mean": patch_mean[k].tolist(),
                          "template_std": patch_std[k].tolist()}
    raise ValueError("no patch has enough stained pixels to serve as a stain template")


def build_template(store_path: str | os.PathLike, json_path: str | os.PathLike,
                   png_path: str | os.PathLike, *, io: float, alpha: float, beta: float,
                   split: str, ignore_clipped: bool) -> StainTemplate:
    """Choose a dataset's template from its patch store; write its JSON and a PNG of the patch."""
    store = PatchStore(store_path)
    rows = store.indices(split)
    if len(rows) == 0:
        raise InputError("stain_template", store_path, f"no patches in split {split!r}")
    try:
        template, stats = choose_template(store.patches, rows, io=io, alpha=alpha, beta=beta,
                                          ignore_clipped=ignore_clipped)
    except ValueError as err:
        raise InputError("stain_template", store_path, str(err)) from err
    slide_idx = int(store.array("slide")[template.index])
    template.slide = store.attrs["slides"][slide_idx] if slide_idx >= 0 else ""
    x, y = store.array("coords")[template.index]
    template.coords = (int(x), int(y))
    patch = store.patches(np.array([template.index]))[0].transpose(1, 2, 0)
    with atomic_path(png_path) as tmp:
        Image.fromarray(patch).save(tmp, format="PNG")
    template.save(json_path, split=split, store=str(store_path), **stats)
    return template
