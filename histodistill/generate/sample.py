"""Rule ``sample_synthetic``: M images per class from a trained generator into a patch store.

Generators are registered by name, one interface (:class:`Generator`: ``sample(c, n, gen)``):

* ``uvit``: the class-conditional U-ViT (InfoDist), DDIM with classifier-free guidance.
* ``histodiffusion``: the unconditional U-ViT steered by the latent classifier's gradient, its
  latents decoded by the fine-tuned decoder (HistoDiffusion).

The store has the patch-store layout (:class:`~histodistill.data.store.StoreWriter`: ``patches``,
``label``, ``split`` = train, coords and slide -1; attributes ``class_names``, ``split_names``,
``patch_size`` and the channel statistics), so later stages read it with ``PatchStore``. Its
attributes also record the generator, the sampling settings, the seed and the model files.
Rows are written class by class in batches; batch k of class c draws its noise from a generator
seeded with (seed, c, k), so a run resumed after a crash (from ``<out>.partial``, whole batches
kept, each verified against the digest recorded after it was written: a damaged batch and those
after it are sampled again) ends with the same store as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from tqdm import tqdm

from histodistill.data.stream import record_channel_stats
from histodistill.data.store import SPLITS, StoreWriter
from histodistill.runtime import device
from histodistill.generate.diffusion import Schedule, cfg_eps, seed_for
from histodistill.generate.autoencoder import load_autoencoder
from histodistill.generate.data import to_uint8
from histodistill.generate.generator import load_uvit
from histodistill.generate.histodiffusion import apply_decoder, guidance_grad, load_classifier
from histodistill.io import settings_hash
from histodistill.registry import registrar

log = logging.getLogger(__name__)
GENERATORS: dict[str, type["Generator"]] = {}
register = registrar(GENERATORS)


class Generator(ABC):
    """A trained generator: ``inputs`` are its model files, ``cfg`` its sampling settings."""

    name = ""
    inputs: tuple[str, ...] = ()

    def __init__(self, files: dict[str, str | os.PathLike], cfg: dict[str, Any],
                 dev: torch.device) -> None:
        missing = [k for k in self.inputs if k not in files]
        if missing:
            raise ValueError(f"generator {self.name!r} needs model files {missing}")
        self.cfg, self.dev = cfg, dev
        self.ae = load_autoencoder(files["autoencoder"], dev)
        self.net, meta = load_uvit(files["uvit"], dev)
        self.schedule = Schedule.from_config(meta["config"]["schedule"])
        self.class_names: list[str] = list(meta["class_names"])
        self.image_size = int(meta["image_size"])
        self.shape = (self.ae.z_channels, self.ae.latent_size, self.ae.latent_size)

    @abstractmethod
    def latents(self, c: int, n: int, gen: torch.Generator) -> torch.Tensor:
        """``n`` latents of class ``c``."""

    @torch.no_grad()
    def sample(self, c: int, n: int, gen: torch.Generator) -> np.ndarray:
        """``n`` images of class ``c`` as uint8 (n, 3, H, W)."""
        return to_uint8(self.ae.images(self.latents(c, n, gen)))


@register("uvit")
class UViTGenerator(Generator):
    """Class-conditional U-ViT with classifier-free guidance (``cfg_scale``)."""

    inputs = ("autoencoder", "uvit")

    def latents(self, c: int, n: int, gen: torch.Generator) -> torch.Tensor:
        if not self.net.num_classes:
            raise ValueError("the uvit generator needs the class-conditional U-ViT (uvit_cond)")
        y = torch.full((n,), c, device=self.dev, dtype=torch.long)
        eps = cfg_eps(self.net, y, self.net.null_label, float(self.cfg["cfg_scale"]))
        return self.schedule.sample(eps, (n, *self.shape), int(self.cfg["steps"]),
                                    float(self.cfg["eta"]), gen, self.dev)


@register("histodiffusion")
class HistoDiffusionGenerator(Generator):
    """Unconditional U-ViT + latent-classifier guidance (``guidance_scale``) + fine-tuned
    decoder."""

    inputs = ("autoencoder", "uvit", "decoder", "classifier")

    def __init__(self, files: dict[str, str | os.PathLike], cfg: dict[str, Any],
                 dev: torch.device) -> None:
        super().__init__(files, cfg, dev)
        if self.net.num_classes:
            raise ValueError("the histodiffusion generator needs the unconditional U-ViT (uvit_uncond)")
        apply_decoder(self.ae, files["decoder"])
        self.clf, meta = load_classifier(files["classifier"], dev)
        self.class_names = list(meta["class_names"])

    def latents(self, c: int, n: int, gen: torch.Generator) -> torch.Tensor:
        y = torch.full((n,), c, device=self.dev, dtype=torch.long)
        return self.schedule.sample(lambda z, t: self.net(z, t), (n, *self.shape),
                                    int(self.cfg["steps"]), float(self.cfg["eta"]), gen, self.dev,
                                    guidance_grad(self.clf, y), float(self.cfg["guidance_scale"]))


def build(name: str, files: dict[str, str | os.PathLike], cfg: dict[str, Any],
          dev: torch.device | None = None) -> Generator:
    if name not in GENERATORS:
        raise KeyError(f"unknown generator {name!r}; available: {sorted(GENERATORS)}")
    return GENERATORS[name](files, cfg, dev or device())


def sample_synthetic(name: str, files: dict[str, str | os.PathLike], out: str | os.PathLike,
                     *, cfg: dict[str, Any], seed: int, per_class: int, batch: int,
                     stop_after: int | None = None, progress: bool = True) -> Path | None:
    """Write ``per_class`` images of every class to the store ``out`` (see module docstring).
    ``stop_after`` ends after that many batches, leaving the partial store (to test resume)."""
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    generator = build(name, files, cfg)
    key = settings_hash({"generator": name, "cfg": cfg, "seed": seed, "per_class": per_class,
                         "batch": batch, "files": {k: _digest(v) for k, v in files.items()}})
    if partial.exists() and not _resumable(partial, key):
        shutil.rmtree(partial)
    attrs = {"class_names": generator.class_names, "split_names": list(SPLITS), "slides": [],
             "patch_size": generator.image_size, "synthetic": True, "generator": name,
             "sampling": cfg, "seed": seed, "per_class": per_class,
             "models": {k: str(v) for k, v in files.items()}, "resume_key": key}
    writer = StoreWriter(partial, generator.image_size, attrs=attrs)
    per_batch = [(c, k, min(batch, per_class - k * batch)) for c in range(len(generator.class_names))
                 for k in range(-(-per_class // batch))]
    digests = list(writer.group.attrs.get("batch_sha256", []))
    done, rows = 0, 0
    while (done < min(len(per_batch), len(digests)) and rows + per_batch[done][2] <= writer.n):
        if _rows_digest(writer, rows, rows + per_batch[done][2]) != digests[done]:
            log.warning("%s: batch %d (rows %d-%d) differs from its digest (damaged); "
                        "resampling from there", partial, done, rows, rows + per_batch[done][2])
            break
        rows += per_batch[done][2]
        done += 1
    writer.truncate(rows)  # drop a batch half written when the run died, or a damaged one
    digests = digests[:done]
    if done:
        log.info("resuming %s after %d of %d verified batches", partial, done, len(per_batch))
    start, calls = time.perf_counter(), 0
    for c, k, n in tqdm(per_batch[done:], desc=f"sample {name}", disable=not progress,
                        initial=done, total=len(per_batch)):
        gen = torch.Generator().manual_seed(seed_for(seed, c, k))
        images = generator.sample(c, n, gen)
        writer.append(images, np.full((n, 2), -1), np.full(n, -1), np.full(n, c),
                      np.full(n, SPLITS.index("train")))
        digests.append(_rows_digest(writer, writer.n - n, writer.n))
        writer.group.attrs["batch_sha256"] = digests  # after the rows: a batch's seal
        calls += 1
        if stop_after is not None and calls >= stop_after:
            return None
    seconds = time.perf_counter() - start
    zarr.open_group(str(partial), mode="a").attrs.update({"seconds_last_run": seconds})
    record_channel_stats(partial)
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return out


def _resumable(partial: Path, key: str) -> bool:
    """Whether a partial store can be resumed: readable and written with ``key``. A damaged one
    (unreadable metadata) is logged by name; either way the caller starts afresh."""
    try:
        found = zarr.open_group(str(partial), mode="r").attrs.get("resume_key")
    except Exception as err:  # noqa: BLE001 (zarr raises many kinds on damaged metadata)
        log.warning("%s is damaged (%s: %s); removed, sampling afresh", partial,
                    type(err).__name__, err)
        return False
    if found != key:
        log.info("%s is from other settings; starting afresh", partial)
        return False
    return True


def _rows_digest(writer: StoreWriter, start: int, stop: int) -> str:
    """SHA-256 of rows ``start:stop`` of the store, pixels and labels as stored."""
    sha = hashlib.sha256(np.ascontiguousarray(writer.group["patches"][start:stop]).tobytes())
    sha.update(np.ascontiguousarray(writer.group["label"][start:stop]).tobytes())
    return sha.hexdigest()


def _digest(path: str | os.PathLike) -> str:
    st = Path(path).stat()
    return f"{st.st_size}:{st.st_mtime_ns}"
