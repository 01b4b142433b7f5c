"""One interface for every distillation method, with seeded RNG and checkpoint/resume.

A method gets a :class:`Context` (real training images in [0, 1] on the device, labels, the
stain template, a checkpoint path) and returns synthetic images and labels. Iterative methods
implement :meth:`Distiller.step`; the base class runs the loop, saves a checkpoint (images,
optimiser, RNG state, iteration) every ``checkpoint_every`` iterations and resumes from it, so
an interrupted run ends with the same result as an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
from abc import ABC
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from histodistill import models
from histodistill.augment import Augment, AugmentConfig
from histodistill.distill.matching import match_loss
from histodistill.stain import StainTemplate
from histodistill.tiling import settings_hash

METHODS: dict[str, type["Distiller"]] = {}
log = logging.getLogger(__name__)


def register(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


@dataclass
class Context:
    """What every method may use."""

    x: torch.Tensor  # (N, 3, H, W) float in [0, 1], on the device
    y: torch.Tensor  # (N,) int64, on the device
    num_classes: int
    seed: int
    template: StainTemplate | None = None
    checkpoint: Path | None = None  # where iterative methods save and resume
    pool: dict[str, Any] = field(default_factory=dict)  # {"net", "net_kwargs", "states"}
    progress: bool = True

    @property
    def im_size(self) -> int:
        return int(self.x.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.x.device

    def class_indices(self) -> list[torch.Tensor]:
        return [torch.nonzero(self.y == c).flatten().cpu() for c in range(self.num_classes)]


class Distiller(ABC):
    """Base class: subclasses set ``name`` via :func:`register` and override :meth:`run`
    (one-shot methods) or :meth:`init_state` and :meth:`step` (iterative methods)."""

    name = ""
    iterations = 0

    def __init__(self, cfg: dict[str, Any], ipc: int, ctx: Context) -> None:
        self.cfg, self.ipc, self.ctx = cfg, ipc, ctx
        self.gen = torch.Generator().manual_seed(ctx.seed)
        self.by_class = ctx.class_indices()
        short = [c for c, idx in enumerate(self.by_class) if len(idx) < ipc]
        if short:
            raise ValueError(f"classes {short} have fewer than ipc={ipc} training patches")

    def augment(self) -> Augment:
        return Augment(AugmentConfig.from_config(self.cfg.get("augment", {})), self.ctx.template)

    def real_batch(self, c: int, n: int) -> torch.Tensor:
        """``n`` random real images of class ``c`` (seeded)."""
        idx = self.by_class[c]
        pick = idx[torch.randperm(len(idx), generator=self.gen)[:n]]
        return self.ctx.x[pick.to(self.ctx.device)]

    def random_real(self) -> torch.Tensor:
        """``ipc`` random real training rows per class: the random coreset, and the start of
        every method that initialises from real patches. Uses its own seed, so all methods
        with the same seed start from the same patches."""
        gen = torch.Generator().manual_seed(self.ctx.seed)
        return torch.cat([idx[torch.randperm(len(idx), generator=gen)[: self.ipc]]
                          for idx in self.by_class])

    def labels(self) -> torch.Tensor:
        return torch.arange(self.ctx.num_classes).repeat_interleave(self.ipc)

    def new_net(self, name: str, kwargs: dict[str, Any] | None = None) -> torch.nn.Module:
        """A freshly initialised network, seeded from this run's generator."""
        seed = int(torch.randint(2**31 - 1, (1,), generator=self.gen))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = models.build(name, self.ctx.num_classes, self.ctx.im_size, **(kwargs or {}))
        return net.to(self.ctx.device)

    def init_from_real(self) -> None:
        """Synthetic images start as the random coreset; SGD on them with momentum 0.5."""
        self.images = self.ctx.x[self.random_real().to(self.ctx.device)].clone().requires_grad_(True)
        self.opt = torch.optim.SGD([self.images], lr=float(self.cfg["lr_img"]), momentum=0.5)
        self.y_syn = self.labels().to(self.ctx.device)

    def syn_slice(self, c: int) -> slice:
        return slice(c * self.ipc, (c + 1) * self.ipc)

    def syn(self, c: int) -> torch.Tensor:
        """The synthetic images of class ``c`` (a view that carries gradients)."""
        return self.images[self.syn_slice(c)]

    def match_step(self, net: torch.nn.Module, params: list[torch.nn.Parameter], distance: str) -> float:
        """One image update of gradient matching: per class, an augmented real batch against the
        class's synthetic images under the same augmentation parameters (``self.aug``)."""
        loss = self.images.new_zeros(())
        for k in range(self.ctx.num_classes):
            real = self.real_batch(k, int(self.cfg["batch_real"]))
            p = self.aug.sample(self.gen)
            loss = loss + match_loss(net, params, self.aug.apply(real, p),
                                     torch.full((len(real),), k, device=real.device),
                                     self.aug.apply(self.syn(k), p), self.y_syn[self.syn_slice(k)], distance)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.item()

    # iterative methods -------------------------------------------------------------------
    def init_state(self) -> None:
        """Create ``self.images`` (a leaf tensor) and ``self.opt``."""

    def step(self, it: int) -> float:
        """One iteration; returns the loss for logging."""
        raise NotImplementedError

    def run(self, stop_after: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run to the end (resuming from a checkpoint) and return images in [0, 1] and labels.

        ``stop_after`` ends the loop early after that many iterations in this call, leaving
        the checkpoint behind (used to test resume).
        """
        self.init_state()
        start = self._resume()
        bar = tqdm(range(start, self.iterations), desc=self.name, disable=not self.ctx.progress,
                   initial=start, total=self.iterations)
        every = int(self.cfg.get("checkpoint_every", 10))
        for done, it in enumerate(bar, 1):
            loss = self.step(it)
            bar.set_postfix(loss=f"{loss:.4g}")
            if (it + 1) % every == 0 or it + 1 == self.iterations:
                self._save(it + 1)
            if stop_after is not None and done >= stop_after:
                self._save(it + 1)
                return self.images.detach().clamp(0, 1), self.labels()
        return self.images.detach().clamp(0, 1), self.labels()

    def _key(self) -> str:
        return settings_hash({"method": self.name, "cfg": self.cfg, "ipc": self.ipc,
                              "seed": self.ctx.seed, "n": len(self.ctx.x)})

    def _save(self, done: int) -> None:
        if self.ctx.checkpoint is None:
            return
        state = {"key": self._key(), "done": done, "images": self.images.detach().cpu(),
                 "opt": self.opt.state_dict(), "gen": self.gen.get_state()}
        tmp = self.ctx.checkpoint.with_suffix(".tmp")
        self.ctx.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, self.ctx.checkpoint)

    def _resume(self) -> int:
        path = self.ctx.checkpoint
        if path is None or not path.exists():
            return 0
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("key") != self._key():
            log.info("checkpoint %s is from other settings; starting afresh", path)
            return 0
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.images.device))
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gen"])
        log.info("resuming %s from iteration %d", self.name, state["done"])
        return int(state["done"])


def build(name: str, cfg: dict[str, Any], ipc: int, ctx: Context) -> Distiller:
    """Instantiate method ``name``."""
    if name not in METHODS:
        raise KeyError(f"unknown distillation method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name](cfg, ipc, ctx)
