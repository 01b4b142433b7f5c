"""Real patches for networks: streamed from patch stores by zarr chunk (never a whole split in
memory) and normalised with the dataset's channel statistics.

The names below are loaded on first use: the workflow imports this package's light submodules
(``ingest``, ``store``) while it builds the DAG, where importing torch would cost every
``snakemake`` call a second."""

from __future__ import annotations

import importlib
from typing import Any

_SOURCES = {"RealData": "real", "Stats": "real", "ClassSampler": "stream",
            "channel_stats": "stream", "iterate": "stream", "read_rows": "stream",
            "record_channel_stats": "stream"}

__all__ = sorted(_SOURCES)


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_SOURCES[name]}"), name)
