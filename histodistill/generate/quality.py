"""Quality of a synthetic store against the real training patches, in a feature space.

* ``fid_in_domain``: the Frechet distance (Heusel et al. 2017) between Gaussian fits of real and
  synthetic features of an encoder trained inside the pipeline on the real patches (rule
  ``train_encoder``). It is named for what it is: not comparable with published FIDs.
* ``fid_inception``: the standard FID's feature space (Inception-v3 pool features of 299 px
  inputs), only when ``inception`` names a local torchvision ``inception_v3`` state dict (no
  weights can be downloaded here). torchvision's Inception is not the TF-Inception of the
  reference FID code, so values differ from published ones by a small margin.
* ``precision``/``recall`` (Kynkaanniemi et al. 2019): the real and synthetic manifolds are unions
  of balls reaching each feature's k-th nearest neighbour in its own set; precision is the share
  of synthetic features inside the real manifold, recall the share of real ones inside the
  synthetic manifold. Computed in the in-domain feature space.
* ``class_agreement`` (with the supervised encoder): the share of synthetic samples that the
  encoder's classifier head assigns to the class they were generated for, overall and per class,
  next to the same share on the compared real patches (``real_agreement``). FID and
  precision/recall do not see a class-conditional generator that ignores its label; this does.

Real features come from at most ``max_real`` seeded training patches, streamed in batches.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import linalg

from histodistill.data.store import PatchStore
from histodistill.data.stream import iterate
from histodistill.io import InputError, atomic_path

log = logging.getLogger(__name__)
Embed = Callable[[torch.Tensor], torch.Tensor]  # uint8 (B, 3, H, W) -> (B, D) features


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets (N, D)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as pytorch-fid does
        off = np.eye(len(s_a)) * 1e-6
        covmean = linalg.sqrtm((s_a + off) @ (s_b + off))
    covmean = np.real(covmean)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def _kth_radius(x: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """Distance from each row of ``x`` to its k-th nearest other row."""
    xt = torch.from_numpy(x)
    out = np.empty(len(x))
    for s in range(0, len(x), chunk):
        d = torch.cdist(xt[s:s + chunk], xt)
        out[s:s + chunk] = d.topk(k + 1, largest=False).values[:, k].numpy()  # [:, 0] is itself
    return out


def _covered(query: np.ndarray, ref: np.ndarray, radii: np.ndarray, chunk: int) -> np.ndarray:
    """Whether each query row lies within some reference row's radius."""
    q, r, rad = torch.from_numpy(query), torch.from_numpy(ref), torch.from_numpy(radii)
    out = np.empty(len(query), bool)
    for s in range(0, len(query), chunk):
        out[s:s + chunk] = (torch.cdist(q[s:s + chunk], r) <= rad[None]).any(1).numpy()
    return out


def precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int, chunk: int = 1024
                     ) -> tuple[float, float]:
    """Kynkaanniemi et al.'s improved precision and recall with k-NN manifolds."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    real, fake = real.astype(np.float64), fake.astype(np.float64)
    precision = _covered(fake, real, _kth_radius(real, k, chunk), chunk).mean()
    recall = _covered(real, fake, _kth_radius(fake, k, chunk), chunk).mean()
    return float(precision), float(recall)


def store_outputs(fns: Sequence[Embed], store: PatchStore, split: str, batch: int,
                  rows: np.ndarray | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Each function's outputs (float64) and the labels of a split (or its ``rows``), from one
    streamed pass in store order."""
    outs: list[list[np.ndarray]] = [[] for _ in fns]
    labels = []
    with torch.no_grad():
        for u8, y, _ in iterate(store, split, batch, None, rows=rows):
            x = torch.from_numpy(u8)
            for out, fn in zip(outs, fns):
                out.append(fn(x).double().cpu().numpy())
            labels.append(y)
    return [np.concatenate(o) for o in outs], np.concatenate(labels)


def store_features(embed: Embed, store: PatchStore, split: str, batch: int,
                   rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of a split (or its ``rows``), streamed in store order."""
    (feats,), labels = store_outputs([embed], store, split, batch, rows)
    return feats, labels


def real_rows(store: PatchStore, max_real: int, seed: int) -> np.ndarray | None:
    """At most ``max_real`` seeded training rows (None: all of them)."""
    rows = store.indices("train")
    if max_real and len(rows) > max_real:
        return np.sort(np.random.default_rng(seed).permutation(rows)[:max_real])
    return None


def inception_embed(path: str | os.PathLike, dev: torch.device) -> Embed:
    """Inception-v3 2048-d pool features (the FID feature space) from a local torchvision
    ``inception_v3`` state dict: inputs resized to 299 px, ImageNet-normalised."""
    import torchvision

    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state.get("state_dict", state))
    except (OSError, RuntimeError, ValueError, AttributeError, EOFError,
            pickle.UnpicklingError) as err:
        raise InputError("generator_quality", path, "generate.quality.inception: not a "
                         f"torchvision inception_v3 state dict ({err})") from err
    net.fc = torch.nn.Identity()
    net = net.to(dev).eval()
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).reshape(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).reshape(1, 3, 1, 1)

    @torch.no_grad()
    def embed(x: torch.Tensor) -> torch.Tensor:
        x = x.to(dev).float().div(255)
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return net((x - mean) / std)

    return embed


def feature_metrics(real: np.ndarray, real_y: np.ndarray, fake: np.ndarray, fake_y: np.ndarray,
                    class_names: list[str], k: int) -> dict[str, Any]:
    """FID, precision and recall overall, and FID per class (where both sides have > 1 sample)."""
    precision, recall = precision_recall(real, fake, k=k)
    per_class = {}
    for c, name in enumerate(class_names):
        a, b = real[real_y == c], fake[fake_y == c]
        if len(a) > 1 and len(b) > 1:
            per_class[name] = frechet_distance(a, b)
    return {"fid": frechet_distance(real, fake), "precision": precision, "recall": recall,
            "fid_per_class": per_class}


def save_grid(rows: list[tuple[str, np.ndarray]], path: str | os.PathLike, cell: int = 64) -> None:
    """Rows of (N, 3, H, W) uint8 images, each image scaled to ``cell`` px; rows of different
    length are padded white."""
    width = max(len(imgs) for _, imgs in rows)
    canvas = np.full((cell * len(rows), cell * width, 3), 255, np.uint8)
    for r, (_, imgs) in enumerate(rows):
        for k, img in enumerate(imgs):
            tile = Image.fromarray(img.transpose(1, 2, 0)).resize((cell, cell), Image.Resampling.NEAREST)
            canvas[r * cell:(r + 1) * cell, k * cell:(k + 1) * cell] = np.asarray(tile)
    with atomic_path(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")


def class_grid(synthetic: PatchStore, real: PatchStore, per_row: int, seed: int,
               path: str | os.PathLike) -> None:
    """Per class, one row of real training patches above one row of synthetic samples."""
    syn_labels, real_labels = synthetic.array("label"), real.array("label")
    real_train = real.array("split") == 0
    rng = np.random.default_rng(seed)
    rows = []
    for c, name in enumerate(real.class_names):
        r = np.flatnonzero(real_train & (real_labels == c))
        s = np.flatnonzero(syn_labels == c)
        pick_r = np.sort(rng.permutation(r)[:per_row])
        pick_s = np.sort(rng.permutation(s)[:per_row])
        rows += [(f"{name} real", real.patches(pick_r)), (f"{name} synthetic", synthetic.patches(pick_s))]
    save_grid(rows, path)


def check_classes(synthetic: PatchStore, real: PatchStore) -> None:
    if synthetic.class_names != real.class_names:
        raise InputError("generator_quality", synthetic.path, f"classes {synthetic.class_names} "
                         f"differ from the real store's {real.class_names}")


def generator_quality(synthetic: str | os.PathLike, store: str | os.PathLike, embed: Embed, *,
                      cfg: dict[str, Any], out: str | os.PathLike, grid: str | os.PathLike,
                      encoder_name: str, inception: Embed | None = None,
                      classify: Embed | None = None, batch: int = 256) -> dict[str, Any]:
    """FID (in-domain; Inception's when given), precision and recall of the synthetic store
    against the real training patches, and with ``classify`` (a classifier's probabilities) the
    class agreement of both; writes the result JSON and the per-class grid."""
    from histodistill.io import write_json

    syn, real = PatchStore(synthetic), PatchStore(store)
    check_classes(syn, real)
    seed, k = int(cfg["seed"]), int(cfg["k"])
    rows = real_rows(real, int(cfg["max_real"]), seed)
    fns = [embed] if classify is None else [embed, classify]  # one pass: features and classes
    (real_f, *real_p), real_y = store_outputs(fns, real, "train", batch, rows)
    (fake_f, *fake_p), fake_y = store_outputs(fns, syn, "train", batch)
    metrics = feature_metrics(real_f, real_y, fake_f, fake_y, real.class_names, k)
    result: dict[str, Any] = {
        "fid_in_domain": metrics["fid"], "precision": metrics["precision"],
        "recall": metrics["recall"], "fid_in_domain_per_class": metrics["fid_per_class"],
        "encoder": encoder_name, "k": k, "n_real": len(real_f), "n_synthetic": len(fake_f),
        "generator": syn.attrs.get("generator"), "sampling": syn.attrs.get("sampling"),
        "fid_inception": None}
    if inception is not None:
        real_i, _ = store_features(inception, real, "train", batch // 4 or 1, rows)
        fake_i, _ = store_features(inception, syn, "train", batch // 4 or 1)
        result["fid_inception"] = frechet_distance(real_i, fake_i)
    if classify is not None:
        fake_hit = fake_p[0].argmax(1) == fake_y
        result["class_agreement"] = float(fake_hit.mean())
        result["class_agreement_per_class"] = {
            name: float(fake_hit[fake_y == c].mean()) for c, name in enumerate(real.class_names)
            if (fake_y == c).any()}
        result["real_agreement"] = float((real_p[0].argmax(1) == real_y).mean())
        log.info("class agreement %.3f (real patches %.3f)", result["class_agreement"],
                 result["real_agreement"])
    log.info("fid_in_domain %.3f, precision %.3f, recall %.3f", result["fid_in_domain"],
             result["precision"], result["recall"])
    class_grid(syn, real, int(cfg["grid_per_class"]), seed, grid)
    write_json(out, result)
    return result


def quality(synthetic: str | os.PathLike, store: str | os.PathLike, encoder: str | os.PathLike,
            *, cfg: dict[str, Any], out: str | os.PathLike, grid: str | os.PathLike
            ) -> dict[str, Any]:
    """:func:`generator_quality` with the pipeline's encoder file (rule ``train_encoder``) and,
    when ``cfg['inception']`` names one, a local Inception-v3 state dict."""
    from histodistill.encoders import load_encoder

    enc = load_encoder(encoder)
    inception = inception_embed(cfg["inception"], enc.device) if cfg.get("inception") else None
    classify = enc.probabilities if enc.kind == "supervised" else None
    return generator_quality(synthetic, store, enc.embed, cfg=cfg, out=out, grid=grid,
                             encoder_name=cfg["encoder"], inception=inception, classify=classify)
