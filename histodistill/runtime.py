"""Where the code runs and with what: the torch device, how networks compute on it (mixed
precision, memory format) and the package versions that a result records. Torch only, so any
stage can import it without importing another stage's code (a rule's code hash covers every
module its script imports)."""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

import torch

M = TypeVar("M", bound=torch.nn.Module)

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


def versions() -> dict[str, str]:
    """Python's version and those of the installed packages a result depends on."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out
