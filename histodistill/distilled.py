"""The distilled-set format every evaluation reads, whichever rule made the set (``distill``,
``distill_slides`` or ``select``): a zarr group ``images`` uint8 (N, 3, H, W), ``labels`` and,
when known, ``sources`` (the real store row each image was made from: provenance for the privacy
audit, never shared), with attributes ``method``, ``ipc``, ``seed``, ``config``,
``source_store``, ``class_names``, ``patch_size``; beside it one image grid (a row per class)
and a cost file (seconds, peak memory, device)."""

from __future__ import annotations

import os
import resource
import shutil
from typing import Any

import numpy as np
import torch
import zarr
from PIL import Image

from histodistill.io import atomic_path, read_json, write_json


def peak_memory_mb() -> float:
    """Peak memory of this run: GPU memory on CUDA, otherwise the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [0, 1] (clamped) as uint8 pixels."""
    return (images.detach().cpu().clamp(0, 1) * 255).round().byte().numpy()


def write_set(out: str | os.PathLike, images8: np.ndarray, labels: np.ndarray,
              attrs: dict[str, Any], sources: np.ndarray | None = None) -> None:
    """Write a set atomically as a zarr group: ``images`` uint8 (N, 3, H, W), ``labels``,
    ``sources`` when given, and ``attrs`` plus the patch size."""
    with atomic_path(out) as tmp:
        group = zarr.open_group(str(tmp), mode="w")
        group.create_array("images", data=images8, chunks=images8.shape)
        group.create_array("labels", data=np.asarray(labels).astype(np.int64))
        if sources is not None:
            group.create_array("sources", data=np.asarray(sources, np.int64))
        group.attrs.update({**attrs, "patch_size": int(images8.shape[-1])})


def write_distilled(images8: np.ndarray, labels: np.ndarray, attrs: dict[str, Any],
                    out_zarr: str | os.PathLike, out_png: str | os.PathLike,
                    out_json: str | os.PathLike, cost: dict[str, Any],
                    sources: np.ndarray | None = None) -> None:
    """The distilled set (:func:`write_set`), its image grid and its cost file: what rule
    ``evaluate`` reads, whichever rule made the set (``distill`` or ``select``)."""
    write_set(out_zarr, images8, labels, attrs, sources)
    save_grid(images8, np.asarray(labels), list(attrs["class_names"]), out_png)
    write_json(out_json, cost)


def adopt(src: dict[str, str | os.PathLike], out: dict[str, str | os.PathLike],
          extra_cost: dict[str, Any]) -> None:
    """Take another rule's set as this one's: copy its ``zarr``, ``grid`` and ``cost`` (each
    atomically) to ``out``'s, the cost file gaining ``extra_cost`` (how the set was chosen)."""
    with atomic_path(out["zarr"]) as tmp:
        shutil.copytree(src["zarr"], tmp)
    with atomic_path(out["grid"]) as tmp:
        shutil.copyfile(src["grid"], tmp)
    cost = read_json(src["cost"], "distill")
    write_json(out["cost"], {**cost, **extra_cost})


def save_grid(images: np.ndarray, labels: np.ndarray, class_names: list[str],
              path: str | os.PathLike, cell: int = 64) -> None:
    """One row per class of (N, 3, H, W) uint8 images, each scaled to ``cell`` pixels."""
    rows = []
    per_class = [images[labels == c] for c in range(len(class_names))]
    width = max(len(p) for p in per_class)
    for imgs in per_class:
        row = np.full((cell, cell * width, 3), 255, np.uint8)
        for k, img in enumerate(imgs):
            tile = Image.fromarray(img.transpose(1, 2, 0)).resize((cell, cell), Image.Resampling.NEAREST)
            row[:, k * cell:(k + 1) * cell] = np.asarray(tile)
        rows.append(row)
    with atomic_path(path) as tmp:
        Image.fromarray(np.concatenate(rows, 0)).save(tmp, format="PNG")
