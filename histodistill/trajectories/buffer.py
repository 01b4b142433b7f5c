"""Rule ``buffer_experts``: train expert networks on the real training split and store their
parameter trajectories (MTT's ``buffer.py``).

Each expert starts from its own seeded initialisation and trains ``epochs`` epochs on the whole
training split, streamed from the patch store (:func:`histodistill.data.stream.iterate` through a
bounded shuffle buffer, as ``full_train`` does), with per-image augmentation (DSA by default)
and plain SGD (the reference: lr 0.01, no momentum, no weight decay, batch 256, constant rate).
Its parameters before training and after every epoch form its trajectory.

Experts are independent resumable units: each finished trajectory is written atomically into
``<out>.partial/`` and sealed with a key of the settings, seed and store contents and a digest of
its bytes (:class:`histodistill.state.Pieces`), so a rerun after a crash or a lost job trains
only the experts that had not finished, and redoes one that was damaged; the store is assembled from
them, one expert at a time, when all are done. Expert e depends only on the settings, the seed
and e, so the key leaves out the number of experts: a run asked for fewer or more experts than an
interrupted one reuses the experts that run finished.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import numpy as np
import torch

from histodistill import models
from histodistill.augment import Augment, AugmentConfig
from histodistill.data.store import PatchStore
from histodistill.runtime import device
from histodistill.training import Inputs, TrainConfig, train
from histodistill.io import atomic_path, settings_hash
from histodistill.trajectories.store import DTYPES, write_store
from histodistill.trajectories.unroll import Student
from histodistill.state import Pieces

log = logging.getLogger(__name__)


def expert_seed(seed: int, expert: int) -> int:
    """Seed of one expert (initialisation, data order, augmentation), derived from the run's."""
    return int(np.random.SeedSequence([seed, expert]).generate_state(1)[0])


def store_key(store: PatchStore) -> list[Any]:
    """What identifies the training data: the store's attributes, size and content digest."""
    return [store.attrs, len(store), store.content_digest()]


def new_expert(cfg: dict[str, Any], inputs: Inputs, seed: int) -> torch.nn.Module:
    """An expert network at its seeded initialisation, on the data's device."""
    store = inputs.store
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = models.build(cfg["net"], len(store.class_names), int(store.attrs["patch_size"]),
                           **cfg["net_kwargs"])
    Student(net)  # refuses networks with buffers before any training
    return net.to(inputs.dev)


def train_expert(cfg: dict[str, Any], inputs: Inputs, seed: int, expert: int,
                 progress: bool = True) -> np.ndarray:
    """One expert's trajectory: (epochs + 1, P) float32 flat parameters. The training split is
    streamed from the store through a shuffle buffer, reshuffled every epoch."""
    s = expert_seed(seed, expert)
    net = new_expert(cfg, inputs, s)
    train_cfg = TrainConfig.from_config({**cfg["train"], "epochs": int(cfg["epochs"])})
    aug = Augment(AugmentConfig.from_config(cfg["augment"]), None, inputs.stats.mean,
                  inputs.stats.std)
    points = [Student(net).flat().cpu().numpy().copy()]

    def snapshot(epoch: int, *_: Any) -> None:
        points.append(Student(net).flat().cpu().numpy().copy())

    curve: dict[str, list[float]] = {}
    train(net, inputs.split_batches("train", train_cfg.batch, s), train_cfg,
          torch.Generator().manual_seed(s), aug, on_epoch=snapshot, progress=progress, curve=curve,
          setting="trajectories.train.epochs")
    log.info("expert %d: training accuracy %.4f after %d epochs", expert, curve["acc"][-1],
             train_cfg.epochs)
    return np.stack(points)


def buffer_experts(store_path: str | os.PathLike, out: str | os.PathLike, cfg: dict[str, Any],
                   *, seed: int, cache_mb: float, progress: bool = True) -> None:
    """Train ``cfg['experts']`` experts on the store's training split and write their
    trajectories to the HDF5 store ``out``, resuming expert by expert from ``<out>.partial``."""
    if cfg["dtype"] not in DTYPES:
        raise ValueError(f"trajectories.dtype {cfg['dtype']!r}: choose one of {sorted(DTYPES)}")
    store = PatchStore(store_path)
    inputs = Inputs(store, None, False, device(), cache_mb)
    settings = {k: v for k, v in cfg.items() if k != "cache_mb"}
    key = settings_hash({"settings": settings, "seed": seed, "store": store_key(store)})
    # the finished experts' key: the same without the number of experts
    per_expert = {k: v for k, v in settings.items() if k != "experts"}
    expert_key = settings_hash({"settings": per_expert, "seed": seed, "store": store_key(store)})
    experts = int(cfg["experts"])
    names = [f"expert_{e:04d}.npy" for e in range(experts)]
    with Pieces(out) as pieces:
        for e, name in enumerate(names):
            if pieces.done(name, expert_key):
                log.info("expert %d/%d already trained (%s)", e + 1, experts, pieces.path(name))
                continue
            traj = train_expert(cfg, inputs, seed, e, progress)
            with atomic_path(pieces.path(name)) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, traj)
            pieces.seal(name, expert_key)
            log.info("expert %d/%d trained and kept in %s", e + 1, experts, pieces.partial)
    files = [pieces.path(name) for name in names]
    student = Student(new_expert(cfg, inputs, 0))
    attrs = {"net": cfg["net"], "net_kwargs": cfg["net_kwargs"],
             "num_classes": len(store.class_names), "im_size": int(store.attrs["patch_size"]),
             "param_names": student.names, "param_shapes": [list(s) for s in student.shapes],
             "settings": settings, "seed": seed, "key": key, "class_names": store.class_names,
             "source_store": str(store_path)}
    write_store(out, (np.load(f, mmap_mode="r") for f in files), experts, int(cfg["epochs"]),
                student.num_params, cfg["dtype"], attrs)
    shutil.rmtree(pieces.partial)
