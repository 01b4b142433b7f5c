"""Where the code runs and with what: the torch device and the package versions that a result
records. Torch only, so any stage can import it without importing another stage's code (a
rule's code hash covers every module its script imports)."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

import torch

PACKAGES = ("histodistill", "torch", "torchvision", "numpy", "zarr", "scikit-learn",
            "openslide-python", "snakemake")


def device() -> torch.device:
    """CUDA when present, else CPU (the same code path)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def versions() -> dict[str, str]:
    """Python's version and those of the installed packages a result depends on."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out
