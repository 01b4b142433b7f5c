"""Training and testing patch classifiers: one loop for every network the pipeline trains.

The same loop trains pool networks, coreset feature networks, encoders, expert networks,
networks on distilled sets and the full-data upper bound, so every number is produced the same
way. The protocol is the DC/DSA reference's ``evaluate_synset``: normalised inputs, per-image
augmentation, SGD (momentum 0.9, weight decay 5e-4), learning rate x0.1 at half. Real splits
are streamed from the patch store in batches (:func:`histodistill.data.stream.iterate`); only
distilled sets, which are small, sit in memory. A loop resumes per epoch from a
:class:`~histodistill.state.Checkpoint`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from histodistill import models
from histodistill.augment import Augment
from histodistill.data.real import Stats, device_batches
from histodistill.data.store import PatchStore
from histodistill.data.stream import PREFETCH, Epoch, iterate
from histodistill.metrics import metrics, summarise_runs
from histodistill.runtime import Compute, Projection
from histodistill.stain import MacenkoNormaliser, StainTemplate
from histodistill.state import Checkpoint

log = logging.getLogger(__name__)
# One epoch of training batches: (normalised images, labels, store rows or None)
Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]]


@dataclass
class TrainConfig:
    """A ``train`` section's optimisation settings; their defaults, DC's evaluation protocol
    (SGD, lr x0.1 at half), are the schema's (``$defs/train``)."""

    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    batch: int
    schedule: str  # "step" (x0.1 at half), "cosine" or "constant"
    # sharpness-aware minimisation (Foret et al. 2021; FTD's flat expert trajectories): each step
    # takes the gradient at the weights moved sam_rho along the normalised gradient (0: plain)
    sam_rho: float
    # how the network computes on its device ($defs/compute: precision, channels_last), resolved
    # by histodistill.runtime.Compute: bfloat16 autocast and channels_last, auto: on for CUDA
    compute: dict[str, Any]

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "TrainConfig":
        """From a validated ``train`` section (every key present)."""
        return cls(**{f.name: cfg[f.name] for f in fields(cls)})


def tensor_batches(x: torch.Tensor, y: torch.Tensor, batch: int, gen: torch.Generator) -> Batches:
    """Shuffled batches of an in-memory set (normalised images), a fresh order every epoch."""

    def batches(order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for idx in order.split(batch):
            yield x[idx.to(x.device)], y[idx.to(y.device)], idx

    def epoch(_: int) -> Epoch[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return Epoch(batches(torch.randperm(len(x), generator=gen)), -(-len(x) // batch))

    return epoch


def scheduler(opt: torch.optim.Optimizer, schedule: str, epochs: int
              ) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch learning-rate schedule: "step" (x0.1 at half), "cosine" or "constant"."""
    if schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(opt, [max(1, epochs // 2)], 0.1)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _grad(p: torch.Tensor) -> torch.Tensor:
    """The gradient of a parameter that has one."""
    assert p.grad is not None
    return p.grad


def sam_gradient(net: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], rho: float) -> None:
    """Replace the gradients in ``net`` (of its loss at w) by SAM's: the gradient of
    ``loss_fn()`` at w + rho * g / ||g||, the weights then restored. The optimiser's step then
    descends towards flat minima (FTD trains its experts so, for flat trajectories)."""
    params = [p for p in net.parameters() if p.grad is not None]
    norm = torch.norm(torch.stack([_grad(p).norm() for p in params])).clamp_min(1e-12)
    moves = []
    with torch.no_grad():
        for p in params:
            e = _grad(p) * (rho / norm)
            p.add_(e)
            moves.append(e)
    net.zero_grad(set_to_none=True)
    loss_fn().backward()
    with torch.no_grad():
        for p, e in zip(params, moves):
            p.sub_(e)


def _autocast_loss(compute: Compute, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
                   ) -> torch.Tensor:
    """The cross-entropy of ``net`` on a batch, under ``compute`` (SAM's second pass)."""
    with compute.autocast():
        return F.cross_entropy(net(compute.inputs(x)), y)


def loop_state(objs: dict[str, Any], gen: torch.Generator, **extra: Any) -> dict[str, Any]:
    """A training loop's resume state at an epoch boundary: ``objs`` (name -> object with
    state_dict: network, optimiser, schedule), the loop's generator, the global torch RNG and
    the loop's own ``extra`` values."""
    return {**{name: obj.state_dict() for name, obj in objs.items()}, "gen": gen.get_state(),
            "torch_rng": torch.get_rng_state(), **extra}


def restore_loop(state: dict[str, Any], objs: dict[str, Any], gen: torch.Generator) -> None:
    """Load :func:`loop_state`'s ``state`` back into ``objs``, ``gen`` and the torch RNG."""
    for name, obj in objs.items():
        obj.load_state_dict(state[name])
    gen.set_state(state["gen"])
    torch.set_rng_state(state["torch_rng"])


def train(net: torch.nn.Module, batches: Batches, cfg: TrainConfig, gen: torch.Generator,
          aug: Augment | None = None, on_epoch: Any = None, progress: bool = False,
          curve: dict[str, list[float]] | None = None,
          checkpoint: Checkpoint | None = None,
          extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
          setting: str = "this stage's train.epochs", repeats: int = 1
          ) -> list[float]:
    """Train ``net`` in place on ``batches(epoch)``; returns seconds per epoch.

    Augmentation draws parameters per image. ``on_epoch(epoch, rows, correct)`` is called after
    each epoch with the rows seen and whether the network classified each correctly when it was
    presented (forgetting uses it). ``curve`` gets each epoch's mean training loss and accuracy
    appended under "loss" and "acc" (the report's training curves). With ``checkpoint`` the
    loop saves after every epoch (network, optimiser, schedule, the loop's generator and the
    global torch RNG, epoch times, curve) and resumes from there (not with ``on_epoch``, whose
    caller holds state of its own). ``extra_loss(logits, labels)`` is added to the
    cross-entropy (InfoDist's boundary loss, :func:`histodistill.select.boundary.boundary_term`).
    The forward pass and loss run under ``cfg``'s :class:`~histodistill.runtime.Compute`
    (bfloat16 autocast, channels_last; the network is left in that memory format).
    After its first steps the loop logs its projected duration (times ``repeats``, the runs of
    its kind still to come), as a warning naming ``setting`` when it exceeds ten minutes
    (:class:`~histodistill.runtime.Projection`).
    """
    if checkpoint is not None and on_epoch is not None:
        raise ValueError("train: a checkpointed loop cannot also report epochs to on_epoch")
    compute = Compute.on(net, cfg.compute)
    compute.model(net)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = scheduler(opt, cfg.schedule, cfg.epochs)
    objs = {"net": net, "opt": opt, "sched": sched}
    times: list[float] = []
    first = 0
    resumed = checkpoint.load() if checkpoint is not None else None
    if resumed is not None:
        assert checkpoint is not None  # resumed only from a checkpoint
        restore_loop(resumed, objs, gen)
        first, times = resumed["epoch"], resumed["times"]
        if curve is not None:
            curve.update(resumed["curve"])
        log.info("resuming training from %s (epoch %d)", checkpoint.path, first)
    projection = Projection(compute.device_type, setting, cfg.epochs - first, repeats)
    net.train()
    for epoch in tqdm(range(first, cfg.epochs), desc="epochs", disable=not progress, leave=False,
                      initial=first, total=cfg.epochs):
        start = time.perf_counter()
        rows, correct = [], []
        loss_sum, hits, seen = 0.0, 0, 0
        epoch_batches = batches(epoch)
        per_epoch = len(epoch_batches) if isinstance(epoch_batches, Sized) else None
        for step, (xb, yb, rb) in enumerate(epoch_batches, 1):
            if aug is not None and aug.enabled:
                xb = aug(xb, gen)
            with compute.autocast():
                logits = net(compute.inputs(xb))
                loss = F.cross_entropy(logits, yb)
                if extra_loss is not None:
                    loss = loss + extra_loss(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.sam_rho > 0:
                sam_gradient(net, lambda: _autocast_loss(compute, net, xb, yb), cfg.sam_rho)
            opt.step()
            if curve is not None:
                loss_sum += float(loss.detach()) * len(yb)
                hits += int((logits.argmax(1) == yb).sum())
                seen += len(yb)
            if on_epoch is not None:
                assert rb is not None, "on_epoch needs batches that carry their rows"
                rows.append(rb.cpu())
                correct.append((logits.argmax(1) == yb).cpu())
            projection.step(step, per_epoch, time.perf_counter() - start)
        sched.step()
        times.append(time.perf_counter() - start)
        projection.epoch(times[-1])
        if curve is not None:
            curve.setdefault("loss", []).append(loss_sum / max(seen, 1))
            curve.setdefault("acc", []).append(hits / max(seen, 1))
        if on_epoch is not None:
            on_epoch(epoch, torch.cat(rows), torch.cat(correct))
        if checkpoint is not None:
            checkpoint.save(loop_state(objs, gen, epoch=epoch + 1, times=times, curve=curve or {}))
    return times


@torch.no_grad()
def predict(net: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor, Any]],
            compute: Compute) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, C, float32) and labels (N,) over batches of normalised images,
    the forward pass under ``compute`` (the training's settings:
    ``Compute.on(net, cfg.compute)``)."""
    net.eval()
    compute.model(net)
    probs, labels = [], []
    for xb, yb, _ in batches:
        with compute.autocast():
            logits = net(compute.inputs(xb))
        probs.append(logits.float().softmax(1).cpu())
        labels.append(yb.cpu())
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


class Inputs:
    """Store patches as evaluation networks see them: optionally stain-normalised to the
    dataset's template (Histo-DD's test-time default), then channel-normalised. Streamed
    splits are read ``prefetch`` batches ahead by a worker thread
    (:func:`~histodistill.data.real.device_batches`; 0: in the caller's thread)."""

    def __init__(self, store: PatchStore, template: StainTemplate | None, stain_norm: bool,
                 dev: torch.device, buffer_mb: float = 1024, prefetch: int = PREFETCH) -> None:
        self.store, self.dev, self.buffer_mb, self.prefetch = store, dev, buffer_mb, prefetch
        self.stats = Stats.from_store(store)
        if stain_norm and template is None:
            raise ValueError("evaluate.stain_norm needs the dataset's stain template")
        self.stain = MacenkoNormaliser(template).to(dev) if stain_norm and template is not None else None

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float pixels (on any device) to network inputs on the device."""
        x = pixels.to(self.dev)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x
        if self.stain is not None:
            with torch.no_grad():
                x = self.stain(x)
        return self.stats.normalise(x)

    def split(self, split: str, batch: int, seed: int | None = None,
              rows: np.ndarray | None = None
              ) -> Epoch[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One streamed pass over a split, or its ``rows`` (store order when ``seed`` is None),
        read ahead by a worker thread."""
        epoch = iterate(self.store, split, batch, seed, self.buffer_mb, rows=rows)
        return Epoch(device_batches(epoch, self, self.dev, self.prefetch), len(epoch))

    def split_batches(self, split: str, batch: int, seed: int, rows: np.ndarray | None = None
                      ) -> Batches:
        """Training batches over a split (or its ``rows``), reshuffled every epoch (seeded)."""
        return lambda epoch: self.split(split, batch, seed * 100003 + epoch, rows=rows)


def evaluate_arch(arch: str, arch_kwargs: dict[str, Any], batches: Callable[[torch.Generator], Batches],
                  inputs: Inputs, im_size: int, num_classes: int, cfg: TrainConfig, runs: int,
                  seed: int, aug: Augment | None, checkpoint: Checkpoint | None = None,
                  split: str = "test",
                  extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                  setting: str = "evaluate.train.epochs"
                  ) -> dict[str, Any]:
    """Train ``arch`` ``runs`` times (seeds seed, seed+1, ...) on ``batches(gen)`` and test each
    on the real ``split`` (``val`` when settings are being chosen). ``checkpoint`` makes a single
    run resumable per epoch; ``setting`` is the one a long training's projection names."""
    if checkpoint is not None and runs != 1:
        raise ValueError("evaluate_arch: a checkpoint resumes a single training run")
    results, times = [], []
    curves: list[dict[str, list[float]]] = []
    for run in tqdm(range(runs), desc=f"{arch} runs", disable=runs == 1):
        gen = torch.Generator().manual_seed(seed + run)
        torch.manual_seed(seed + run)
        net = models.build(arch, num_classes, im_size, **arch_kwargs).to(inputs.dev)
        curves.append({})
        times += train(net, batches(gen), cfg, gen, aug, progress=runs == 1, curve=curves[-1],
                       checkpoint=checkpoint, extra_loss=extra_loss, setting=setting,
                       repeats=runs - run)
        prob, y = predict(net, inputs.split(split, 512), Compute.on(net, cfg.compute))
        if len(y) == 0:
            raise ValueError(f"{inputs.store.path} has no {split} split to evaluate on")
        results.append(metrics(y, prob))
        log.info("%s run %d/%d: acc %.4f, auc %.4f (%.1fs)", arch, run + 1, runs,
                 results[-1]["acc"], results[-1]["auc"], sum(times[-cfg.epochs:]))
    return summarise_runs(results, times, curves)
