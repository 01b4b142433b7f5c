"""Where the code runs and with what: the torch device, how networks compute on it (mixed
precision, memory format) and the package versions that a result records. Torch only, so any
stage can import it without importing another stage's code (a rule's code hash covers every
module its script imports)."""

from __future__ import annotations

import contextlib
import logging
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

import torch

M = TypeVar("M", bound=torch.nn.Module)
log = logging.getLogger(__name__)

PACKAGES = ("histodistill", "torch", "torchvision", "numpy", "zarr", "scikit-learn",
            "openslide-python", "snakemake")


def device() -> torch.device:
    """CUDA when present, else CPU (the same code path)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


PRECISIONS = ("auto", "bf16", "fp32")  # the schema's `precision` values
CHANNELS_LAST = ("auto", True, False)  # the schema's `channels_last` values


@dataclass(frozen=True)
class Compute:
    """How a network trains and is tested on its device: bfloat16 autocast (mixed precision: the
    forward pass and loss in bfloat16 where autocast deems it safe; weights, gradients and the
    optimiser's state stay float32, so no loss scaling is needed) and the channels_last memory
    format of the network's 4-d weights and inputs. Resolved from a training's ``compute``
    settings (``$defs/compute``: ``precision``, ``channels_last``) by :meth:`of`: ``auto`` turns
    each on for CUDA and off elsewhere, so a CPU run computes exactly as it would without them.
    Network training only: gradient matching and trajectory unrolls run in float32 whatever the
    settings."""

    device_type: str
    bf16: bool
    channels_last: bool

    @classmethod
    def of(cls, dev: torch.device | str, settings: Mapping[str, Any]) -> "Compute":
        """The computation on ``dev`` that a validated ``compute`` section asks for: its
        ``precision`` (auto, bf16 or fp32) and ``channels_last`` (auto, true or false)."""
        dev = torch.device(dev)
        precision, channels_last = settings["precision"], settings["channels_last"]
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: choose one of {PRECISIONS}")
        if channels_last not in CHANNELS_LAST or not isinstance(channels_last, (str, bool)):
            raise ValueError(f"channels_last {channels_last!r}: choose one of {CHANNELS_LAST}")
        cuda = dev.type == "cuda"
        return cls(dev.type, precision == "bf16" or (precision == "auto" and cuda),
                   channels_last is True or (channels_last == "auto" and cuda))

    @classmethod
    def on(cls, net: torch.nn.Module, settings: Mapping[str, Any]) -> "Compute":
        """:meth:`of` on the device of ``net``'s parameters (CPU for a network without any)."""
        param = next(net.parameters(), None)
        return cls.of(param.device if param is not None else "cpu", settings)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context the forward pass and loss run in: bfloat16 autocast when on, else a
        no-op (the float32 path, untouched). Call ``backward`` outside it."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16)

    def model(self, net: M) -> M:
        """``net`` with its 4-d weights in channels_last when that is on (in place: the same
        parameter objects, so an optimiser made before still holds them); else unchanged."""
        if self.channels_last:
            net.to(memory_format=torch.channels_last)
        return net

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of images (N, C, H, W) in channels_last when that is on; else ``x``."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x


LONG_STAGE_S = 600.0  # a loop projected to run longer than this is announced as a warning


def describe(dev: torch.device | str) -> str:
    """The device in words for a log line: "2 CPU threads" or the GPU's name."""
    dev = torch.device(dev)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{torch.get_num_threads()} CPU threads"


def human(seconds: float) -> str:
    """A duration as "~40 s", "~12 min" or "~2.1 h"."""
    if seconds < 100:
        return f"~{seconds:.0f} s"
    if seconds < 6000:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


class Projection:
    """A training loop's duration projected from its first steps and logged once, as a warning
    naming the ``setting`` that governs it when it will run longer than :data:`LONG_STAGE_S`
    ("training: ~2.1 h on 2 CPU threads at these settings (30 epochs of 125 steps); see
    encoders.supervised.train.epochs"), so a user on a laptop learns at once what a default
    meant for a GPU costs, not after hours. Steps after the first are timed (the first pays for
    allocations); with an epoch of unknown length, the first whole epoch is."""

    def __init__(self, dev: torch.device | str, setting: str, epochs: int, repeats: int = 1,
                 probe: int = 5) -> None:
        self.dev, self.setting, self.epochs, self.repeats = dev, setting, epochs, repeats
        self.probe, self.told = probe, False
        self.first_step_s: float | None = None

    def step(self, done: int, per_epoch: int | None, elapsed: float) -> None:
        """After ``done`` steps of the first epoch (of ``per_epoch``, None when unknown),
        ``elapsed`` seconds into it."""
        if self.told or per_epoch is None:
            return
        if done == 1:
            self.first_step_s = elapsed
        if done == min(self.probe, per_epoch) and done > 1 and self.first_step_s is not None:
            per_step = (elapsed - self.first_step_s) / (done - 1)
            self._tell(per_step * per_epoch, per_epoch)

    def epoch(self, seconds: float) -> None:
        """After the first epoch, ``seconds`` long (when its steps did not already tell)."""
        if not self.told:
            self._tell(seconds, None)

    def _tell(self, epoch_s: float, per_epoch: int | None) -> None:
        self.told = True
        total = epoch_s * self.epochs * self.repeats
        runs = f"{self.repeats} runs of " if self.repeats > 1 else ""
        steps = f" of {per_epoch} steps" if per_epoch is not None else ""
        line = (f"training: {human(total)} on {describe(self.dev)} at these settings "
                f"({runs}{self.epochs} epochs{steps})")
        if total > LONG_STAGE_S:
            log.warning("%s; see %s", line, self.setting)
        else:
            log.info("%s", line)


def versions() -> dict[str, str]:
    """Python's version and those of the installed packages a result depends on."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out
