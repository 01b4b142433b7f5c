"""The resumable training loop shared by every generator-stage training (autoencoder, U-ViT,
decoder fine-tuning, latent classifier), after U-ViT's ``TrainState``.

One :class:`TrainState` holds everything stateful: the trained modules and their EMA copies,
optimisers and learning-rate schedules, the step, the torch generator every random draw comes
from, and the data source's sampler state. It saves itself atomically to one checkpoint file and
loads itself back only when the checkpoint's key (settings and input contents) matches, so a run
interrupted at any checkpoint and resumed ends bit-identical to an uninterrupted one.
:func:`fit` is the loop: resume, call the training's ``step`` function, update EMA weights,
checkpoint every ``checkpoint_every`` steps, and keep a short loss history.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from histodistill.data.store import PatchStore, fingerprint
from histodistill.io import settings_hash
from histodistill.state import Checkpoint, save_state

log = logging.getLogger(__name__)


def seeded(seed: int, build: Any) -> Any:
    """``build()`` under a fixed torch seed, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def warmup(steps: int) -> Callable[[int], float]:
    """U-ViT's schedule: linear warm-up over ``steps``, then constant."""
    return lambda step: min((step + 1) / steps, 1.0) if steps > 0 else 1.0


@dataclass
class TrainState:
    """Modules, EMA copies, optimisers, schedules, step, RNG and data state of one training."""

    modules: dict[str, torch.nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    gen: torch.Generator
    key: str
    data: Any = None  # anything with state_dict()/load_state_dict() (the patch source)
    ema_rate: float | None = None  # None: no EMA copies
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = field(default_factory=dict)
    ema: dict[str, torch.nn.Module] = field(default_factory=dict)
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    window: dict[str, tuple[float, int]] = field(default_factory=dict)  # loss sums, counts since the last log

    def __post_init__(self) -> None:
        if self.ema_rate is not None and not self.ema:
            self.ema = {name: copy.deepcopy(m).eval().requires_grad_(False)
                        for name, m in self.modules.items()}

    @torch.no_grad()
    def ema_update(self) -> None:
        """ema = rate * ema + (1 - rate) * weights, parameter by parameter (U-ViT's)."""
        for name, avg in self.ema.items():
            assert self.ema_rate is not None  # EMA copies are made only with a rate
            src = dict(self.modules[name].named_parameters())
            for pname, p in avg.named_parameters():
                p.mul_(self.ema_rate).add_(src[pname].detach(), alpha=1 - self.ema_rate)
            for (_, b), (_, sb) in zip(avg.named_buffers(), self.modules[name].named_buffers()):
                b.copy_(sb)

    def state_dict(self) -> dict[str, Any]:
        return {"key": self.key, "step": self.step, "history": self.history, "window": self.window,
                "modules": {k: m.state_dict() for k, m in self.modules.items()},
                "ema": {k: m.state_dict() for k, m in self.ema.items()},
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
                "gen": self.gen.get_state(),
                "data": self.data.state_dict() if self.data is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        for k, m in self.modules.items():
            m.load_state_dict(state["modules"][k])
        for k, m in self.ema.items():
            m.load_state_dict(state["ema"][k])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        self.gen.set_state(state["gen"])
        if self.data is not None:
            self.data.load_state_dict(state["data"])
        self.step, self.history = int(state["step"]), list(state["history"])
        self.window = dict(state["window"])


def fit(state: TrainState, step_fn: Callable[[int], dict[str, float]], steps: int,
        checkpoint: str | os.PathLike | None, every: int, desc: str, log_every: int = 100,
        stop_after: int | None = None, progress: bool = True) -> float:
    """Train ``state`` up to ``steps`` steps, resuming from ``checkpoint``; returns the seconds
    spent in this call. ``step_fn(step)`` does one optimisation step and returns its losses;
    schedules and EMA advance after it. ``stop_after`` ends early after that many steps in this
    call, leaving a checkpoint (to test resume)."""
    ckpt = Checkpoint(checkpoint, state.key)
    resumed = ckpt.load()
    if resumed is not None:
        state.load_state_dict(resumed)
        log.info("resuming %s from step %d (%s)", desc, state.step, checkpoint)
    start = time.perf_counter()
    bar = tqdm(range(state.step, steps), desc=desc, initial=state.step, total=steps,
               disable=not progress, mininterval=5)
    for done, step in enumerate(bar, 1):
        for module in state.modules.values():
            module.train()
        losses = step_fn(step)
        for sched in state.schedulers.values():
            sched.step()
        state.ema_update()
        state.step = step + 1
        for k, v in losses.items():
            total, n = state.window.get(k, (0.0, 0))
            state.window[k] = (total + v, n + 1)
        if state.step % log_every == 0 or state.step == steps:
            mean = {k: total / n for k, (total, n) in state.window.items()}
            state.history.append({"step": state.step, **mean})
            bar.set_postfix({k: f"{v:.4g}" for k, v in mean.items()})
            log.info("%s step %d: %s", desc, state.step,
                     ", ".join(f"{k} {v:.4g}" for k, v in mean.items()))
            state.window = {}
        stop = stop_after is not None and done >= stop_after
        if checkpoint is not None and (state.step % every == 0 or state.step == steps or stop):
            ckpt.save(state.state_dict())
        if stop:
            break
    return time.perf_counter() - start


def inputs_key(settings: Any, stores: list[str | os.PathLike],
               files: list[str | os.PathLike]) -> str:
    """Resume key of a training: its settings, the contents of its patch stores and the bytes
    of its model inputs (:func:`histodistill.data.store.fingerprint`)."""
    return settings_hash([settings, *[fingerprint(PatchStore(p), *(files if i == 0 else ()))
                                      for i, p in enumerate(stores)]])


def save_model(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write a trained model's file (weights and plain metadata)."""
    save_state(payload, path)
