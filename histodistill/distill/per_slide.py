"""Per-slide distillation (Histo-DD's slide-level protocol): the configured method applied to
each training slide separately, from that slide's patches to at most ``ipc`` synthetic patches
per class present on it.

The method code is the one of :mod:`histodistill.distill` (registry, resume, seeding); only its
real data changes: a :class:`~histodistill.data.real.RealData` restricted to the slide's store rows
(streamed like the whole split). A class with ``n < ipc`` patches on the slide gets ``n``
synthetic patches (initialised from all of them, then optimised as the others), an absent class
none, so a slide's set never holds more than ``ipc`` patches of a class (README: slide level).

:func:`distill_slides` handles one batch of slides (one job of rule ``distill_slides``). Slides
are done one at a time into ``<out>.partial``: a finished slide is kept there (sealed with its
settings, inputs and contents; a damaged one is redone) and an unfinished iterative one resumes from
its checkpoint, so a rerun
after a crash redoes nothing; ``out`` appears when every slide of the batch is done.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histodistill.config import check_per_slide
from histodistill.data.real import RealData
from histodistill.data.store import PatchStore, Slide, fingerprint, store_slides
from histodistill.distill.base import Context, build
from histodistill.distilled import to_uint8, write_set
from histodistill.runtime import device
from histodistill.io import InputError, settings_hash
from histodistill.stain import StainTemplate
from histodistill.state import load_input
from histodistill.state import Pieces

log = logging.getLogger(__name__)
STAGE = "distill_slides"


def slide_seed(seed: int, index: int) -> int:
    """The seed of one slide's distillation, derived from the run's seed and the slide's table
    position (independent of which batch the slide is in)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] >> 1)


def distill_slides(store_path: str | os.PathLike, template_path: str | os.PathLike | None, *,
                   pool_path: str | os.PathLike | None, method: str, ipc: int,
                   cfg: dict[str, Any], seed: int, slides: list[str], out: str | os.PathLike,
                   cache_mb: float, progress: bool = True) -> Path:
    """Distil each training slide in ``slides`` into ``out/<slide>.zarr`` (the layout of a
    distilled set, attrs adding ``slide``, ``real_counts`` and ``seconds``).

    Slides the tiler skipped (no tissue) are left out with a log line; a slide that is not in
    the store, has no patches or is not a training slide is an :class:`InputError`.
    """
    try:
        check_per_slide(method)
    except ValueError as err:
        raise InputError(STAGE, f"method {method}", str(err)) from None
    store = PatchStore(store_path)
    found = {s.name: s for s in store_slides(store)}
    skipped = set(store.attrs.get("skipped_slides", []))
    template = StainTemplate.load(template_path) if template_path else None
    dev = device()
    pool = load_input(pool_path, "pretrain_pool") if pool_path else {}
    inputs = fingerprint(store, pool_path, template_path)
    settings = {k: v for k, v in cfg.items() if k != "checkpoint_every"}
    done = []
    with Pieces(out, resumable="*.ckpt") as pieces:  # an unfinished slide's checkpoint
        for name in slides:
            if name in skipped:
                log.info("%s: skipped by the tiler (no tissue), no synthetic patches", name)
                continue
            slide = found.get(name)
            if slide is None:
                listed = name in store.attrs.get("slides", [])
                raise InputError(STAGE, store_path, f"slide {name!r} " + (
                    "has no patches in the store" if listed else "is not in the store"))
            if slide.split != "train":
                raise InputError(STAGE, store_path, f"slide {name!r} is a {slide.split} slide; only "
                                 "training slides are distilled")
            target = f"{name}.zarr"
            key = settings_hash({"method": method, "cfg": settings, "ipc": ipc, "seed": seed,
                                 "slide": name, "rows": slide.rows.tolist(), "inputs": inputs})
            done.append(target)
            if pieces.done(target, key):
                log.info("%s: already distilled, kept", name)
                continue
            _distil_one(store, slide, method, ipc, cfg, slide_seed(seed, slide.index), template,
                        pool, inputs, dev, cache_mb, pieces.partial, key, progress)
            pieces.seal(target, key)
        return pieces.finish(set(done))  # checkpoints and slides that left the batch go


def _distil_one(store: PatchStore, slide: Slide, method: str, ipc: int, cfg: dict[str, Any],
                seed: int, template: StainTemplate | None, pool: dict[str, Any], inputs: str,
                dev: torch.device, cache_mb: float, partial: Path, key: str,
                progress: bool) -> None:
    real = RealData(store, "train", cache_mb, seed, dev, rows=slide.rows)
    checkpoint = partial / f"{slide.name}.ckpt"
    ctx = Context(real, seed, template, checkpoint, pool, progress, inputs, per_slide=True)
    start = time.perf_counter()
    images, labels = build(method, cfg, ipc, ctx).run()
    seconds = time.perf_counter() - start
    write_set(partial / f"{slide.name}.zarr", to_uint8(images), labels.cpu().numpy(),
              {"method": method, "ipc": ipc, "seed": seed, "config": cfg, "key": key,
               "slide": slide.name, "label": slide.label, "centre": slide.centre,
               "class_names": store.class_names, "real_counts": real.counts,
               "source_store": str(store.path), "seconds": seconds})
    checkpoint.unlink(missing_ok=True)
    log.info("%s: %d real patches %s -> %d synthetic (%.1fs)", slide.name, len(slide.rows),
             real.counts, len(images), seconds)
