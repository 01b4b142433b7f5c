"""One interface for every distillation method, with seeded RNG and checkpoint/resume.

A method gets a :class:`Context`: the real training split as a streamed, class-balanced
:class:`~histodistill.data.real.RealData` (never loaded whole), the stain template, the network pool
and a checkpoint path. It returns synthetic images in [0, 1] and labels. Iterative methods
implement :meth:`Distiller.init_state` and :meth:`Distiller.step`; the base class runs the loop,
saves a checkpoint (images, optimiser, RNG and sampler state, iteration) every
``checkpoint_every`` iterations and resumes from it, so an interrupted run ends with the same
result as an uninterrupted one.

Synthetic images live where each method's reference keeps them (``space``): DC/DSA/DM in the
network's normalised space, Histo-DD (after Acc-DD/IDC) in pixels, normalised on the way into the
network. Either way they are clamped to the valid pixel range after every image step.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from histodistill import models
from histodistill.augment import Augment, AugmentConfig
from histodistill.data.real import RealData, Stats
from histodistill.distill.matching import cross_entropy, match_loss
from histodistill.io import settings_hash
from histodistill.stain import StainTemplate
from histodistill.registry import registrar
from histodistill.state import Checkpoint

METHODS: dict[str, type["Distiller"]] = {}
log = logging.getLogger(__name__)


register = registrar(METHODS)


@dataclass
class Context:
    """What every method may use."""

    real: RealData  # the real training split, streamed
    seed: int
    template: StainTemplate | None = None
    checkpoint: Path | None = None  # where iterative methods save and resume
    pool: dict[str, Any] = field(default_factory=dict)  # {"net", "net_kwargs", "states"}
    progress: bool = True
    fingerprint: str = ""  # contents of the inputs (store, pool, template): part of the resume key
    per_slide: bool = False  # one slide's patches: a class with n < ipc patches gets n images
    experts: Path | None = None  # expert-trajectory store (trajectory matching)
    autoencoder: Path | None = None  # the generator's autoencoder (latent methods: GLaD, SLFD)

    @property
    def num_classes(self) -> int:
        return self.real.num_classes

    @property
    def im_size(self) -> int:
        return self.real.im_size

    @property
    def device(self) -> torch.device:
        return self.real.device

    @property
    def stats(self) -> Stats:
        return self.real.stats


class Distiller(ABC):
    """Base class: subclasses set ``name`` via :func:`register` and override :meth:`run`
    (one-shot methods) or :meth:`init_state` and :meth:`step` (iterative methods)."""

    name = ""
    iterations = 0
    space = "normalised"  # where the synthetic images live: "normalised" or "pixel"
    real_patches = False  # the result is real patients' patches (coresets), not synthetic
    # Store rows of the real patches the images were made from (a coreset's picks, a real
    # initialisation), one per image, set by run(); None when no image starts from a real patch.
    # The privacy audit's most exposed members (written to the distilled set as ``sources``).
    source_rows: np.ndarray | None = None
    aug: Augment  # the methods that augment set it in init_state (:meth:`augment`)

    def __init__(self, cfg: dict[str, Any], ipc: int, ctx: Context) -> None:
        self.cfg, self.ipc, self.ctx = cfg, ipc, ctx
        self.gen = torch.Generator().manual_seed(ctx.seed)
        # the run's cost, carried through resumes: optimiser steps on the synthetic set and
        # seconds spent in the loop (the budget unit of a comparison; docs: results protocol)
        self.image_updates = 0
        self.seconds = 0.0
        self.diverged_at: int | None = None  # first iteration with a non-finite loss or image
        counts = ctx.real.counts
        short = [c for c, n in enumerate(counts) if n < ipc]
        if short and not ctx.per_slide:
            raise ValueError(f"classes {short} have fewer than ipc={ipc} training patches")
        # images per class: ipc, or on one slide all of a class's n < ipc patches (none if absent)
        self.ipcs = [min(ipc, n) for n in counts]
        self.classes = [c for c, k in enumerate(self.ipcs) if k]
        self._offsets = np.concatenate([[0], np.cumsum(self.ipcs)]).astype(int)

    def augment(self) -> Augment:
        """The method's augmentation, working in normalised space."""
        return Augment(AugmentConfig.from_config(self.cfg["augment"]), self.ctx.template,
                       self.ctx.stats.mean, self.ctx.stats.std)

    def real_batch(self, c: int, n: int) -> torch.Tensor:
        """``n`` random normalised real patches of class ``c``."""
        return self.ctx.real.batch(c, n)

    def random_rows(self) -> np.ndarray:
        """``ipc`` random store rows per class: the random coreset and the start of every method
        initialised from real patches (its own seed, so all methods start alike)."""
        return self.ctx.real.initial_rows(self.ipcs, self.ctx.seed)

    def labels(self) -> torch.Tensor:
        return torch.arange(self.ctx.num_classes).repeat_interleave(torch.tensor(self.ipcs))

    def new_net(self, name: str, kwargs: dict[str, Any] | None = None) -> models.Classifier:
        """A freshly initialised network, seeded from this run's generator."""
        seed = int(torch.randint(2**31 - 1, (1,), generator=self.gen))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = models.build(name, self.ctx.num_classes, self.ctx.im_size, **(kwargs or {}))
        return net.to(self.ctx.device)

    # synthetic images ----------------------------------------------------------------------
    def init_from_real(self) -> None:
        """Synthetic images start as the random coreset; SGD on them with momentum 0.5."""
        self.source_rows = self.random_rows()
        pixels = self.ctx.real.pixels_of(self.source_rows)
        start = pixels if self.space == "pixel" else self.ctx.stats.normalise(pixels)
        self.images = start.clone().requires_grad_(True)
        self.opt = torch.optim.SGD([self.images], lr=float(self.cfg["lr_img"]), momentum=0.5)
        self.y_syn = self.labels().to(self.ctx.device)

    def to_net(self, images: torch.Tensor) -> torch.Tensor:
        """Synthetic images (in ``space``) as network inputs."""
        return self.ctx.stats.normalise(images) if self.space == "pixel" else images

    def syn_slice(self, c: int) -> slice:
        return slice(int(self._offsets[c]), int(self._offsets[c + 1]))

    def syn(self, c: int) -> torch.Tensor:
        """Class ``c``'s synthetic images as network inputs (carrying gradients)."""
        return self.to_net(self.images[self.syn_slice(c)])

    def clamp_(self) -> None:
        """Keep every synthetic pixel in the valid range [0, 1] (in either space)."""
        with torch.no_grad():
            if self.space == "pixel":
                self.images.clamp_(0, 1)
            else:
                lo, hi = self.ctx.stats.bounds(self.images)
                self.images.copy_(torch.minimum(torch.maximum(self.images, lo), hi))

    def image_step(self, loss: torch.Tensor) -> None:
        """One optimiser step on the images (and any further parameters in ``self.opt``, such as
        SLFD's module), then the clamp. With ``unit_grad`` each image's gradient, and each
        further parameter tensor's, is rescaled to unit L2 norm first, so the step size is the
        group's rate whatever the loss's scale (network width, batch size, layer count)."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.get("unit_grad"):  # a setting of every method but mtt and ptm (plain steps)
            for group in self.opt.param_groups:
                for p in group["params"]:
                    g = p.grad
                    if g is None:
                        continue
                    if p is self.images:  # per image
                        g.div_(g.flatten(1).norm(dim=1).clamp_min(1e-12)
                               .view(-1, *[1] * (g.dim() - 1)))
                    else:  # per tensor
                        g.div_(g.norm().clamp_min(1e-12))
        self.opt.step()
        self.image_updates += 1
        self.clamp_()

    def class_match(self, net: torch.nn.Module, params: list[torch.nn.Parameter], c: int,
                    distance: str) -> torch.Tensor:
        """Gradient distance of class ``c``: an augmented real batch against the class's
        synthetic images under the same augmentation parameters (siamese, one draw)."""
        real = self.real_batch(c, int(self.cfg["batch_real"]))
        p = self.aug.sample(self.gen)
        return match_loss(net, params, self.aug.apply(real, p),
                          torch.full((len(real),), c, device=real.device),
                          self.aug.apply(self.syn(c), p), self.y_syn[self.syn_slice(c)], distance,
                          self.syn_loss)

    def syn_loss(self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss whose gradient on the synthetic batch is matched (cross-entropy; SLFD's is
        stochastic)."""
        return cross_entropy(net, x, y)

    def match_step(self, net: torch.nn.Module, params: list[torch.nn.Parameter], distance: str,
                   per_class: bool) -> float:
        """Gradient matching over all classes: one image step per class (Histo-DD's Algorithm 1)
        or one step on the summed loss (DC/DSA). Returns the summed distance."""
        total = 0.0
        loss = self.images.new_zeros(())
        for c in self.classes:
            loss_c = self.class_match(net, params, c, distance)
            total += loss_c.item()
            if per_class:
                self.image_step(loss_c)
            else:
                loss = loss + loss_c
        if not per_class:
            self.image_step(loss)
        return total

    def result(self) -> torch.Tensor:
        """The synthetic images as pixels in [0, 1]."""
        images = self.images.detach()
        if self.space != "pixel":
            images = self.ctx.stats.pixels(images)
        return images.clamp(0, 1)

    # iterative methods -------------------------------------------------------------------
    def init_state(self) -> None:
        """Create ``self.images`` (a leaf tensor) and ``self.opt``."""

    def step(self, it: int) -> float:
        """One iteration; returns the loss for logging."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        """Method state beyond images, their optimiser and the RNGs, saved in checkpoints."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state`."""

    def run(self, stop_after: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run to the end (resuming from a checkpoint) and return images in [0, 1] and labels.
        A loss or images that stop being finite end the run there (``diverged_at``).

        ``stop_after`` ends the loop early after that many iterations in this call, leaving
        the checkpoint behind (used to test resume).
        """
        self.init_state()
        start = self._resume()
        bar = tqdm(range(start, self.iterations), desc=self.name, disable=not self.ctx.progress,
                   initial=start, total=self.iterations)
        every = int(self.cfg["checkpoint_every"])
        for done, it in enumerate(bar, 1):
            began = time.perf_counter()
            loss = self.step(it)
            self.seconds += time.perf_counter() - began
            if not (math.isfinite(loss) and bool(torch.isfinite(self.images).all())):
                self.diverged_at = it
                log.warning("%s: the loss (%s) or the synthetic images are not finite at "
                            "iteration %d: the optimisation diverged; stopping (the rest of "
                            "the budget cannot recover it)", self.name, loss, it)
                break
            bar.set_postfix(loss=f"{loss:.4g}")
            if (it + 1) % every == 0 or it + 1 == self.iterations:
                self._save(it + 1)
            if stop_after is not None and done >= stop_after:
                self._save(it + 1)
                break
        return self.result(), self.labels()

    def _key(self) -> str:
        cfg = {k: v for k, v in self.cfg.items() if k != "checkpoint_every"}
        return settings_hash({"format": 3, "method": self.name, "cfg": cfg, "ipc": self.ipc,
                              "seed": self.ctx.seed, "counts": self.ctx.real.counts,
                              "inputs": self.ctx.fingerprint})

    def _save(self, done: int) -> None:
        if self.ctx.checkpoint is None:  # nothing to write: skip copying the state
            return
        state = {"done": done, "images": self.images.detach().cpu(),
                 "opt": self.opt.state_dict(), "gen": self.gen.get_state(),
                 "real": self.ctx.real.state_dict(), "extra": self.extra_state(),
                 "image_updates": self.image_updates, "seconds": self.seconds,
                 "diverged_at": self.diverged_at}
        Checkpoint(self.ctx.checkpoint, self._key()).save(state)

    def _resume(self) -> int:
        state = Checkpoint(self.ctx.checkpoint, self._key()).load()
        if state is None:
            return 0
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.images.device))
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gen"])
        self.ctx.real.load_state_dict(state["real"])
        self.load_extra_state(state.get("extra", {}))
        self.image_updates = int(state["image_updates"])
        self.seconds = float(state["seconds"])
        self.diverged_at = state["diverged_at"]
        log.info("resuming %s from iteration %d", self.name, state["done"])
        return int(state["done"])


def build(name: str, cfg: dict[str, Any], ipc: int, ctx: Context) -> Distiller:
    """Instantiate method ``name``."""
    if name not in METHODS:
        raise KeyError(f"unknown distillation method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name](cfg, ipc, ctx)
