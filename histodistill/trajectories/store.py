"""The expert-trajectory store: one HDF5 file per dataset and architecture.

Dataset ``params`` (experts, epochs + 1, P) holds each expert's flat parameter vector (the
layout of :class:`~histodistill.trajectories.unroll.Student`) before training (epoch 0) and after
every epoch, in float32 or float16, chunked one (expert, epoch) row per chunk so that reading a
start and a target point reads two chunks, never a whole trajectory. Attributes record the
network (``net``, ``net_kwargs``, ``num_classes``, ``im_size``, parameter names and shapes), the
training settings, the seed, the class names and the patch store the experts were trained on,
and ``key``: a hash of all that and of the store's contents (part of a distillation's resume key).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

from histodistill import models
from histodistill.io import InputError, atomic_path

DTYPES = {"float32": np.float32, "float16": np.float16}
JSON_ATTRS = ("net_kwargs", "param_names", "param_shapes", "settings", "class_names")


def write_store(out: str | os.PathLike, trajectories: Iterable[np.ndarray], experts: int,
                epochs: int, num_params: int, dtype: str, attrs: dict[str, Any]) -> None:
    """Write ``experts`` trajectories, each (epochs + 1, num_params), into a new store at
    ``out`` (atomically: a crash leaves no file). ``trajectories`` is consumed one at a time."""
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset("params", shape=(experts, epochs + 1, num_params),
                                  dtype=DTYPES[dtype], chunks=(1, 1, num_params))
            written = 0
            for e, traj in enumerate(trajectories):
                if traj.shape != (epochs + 1, num_params):
                    raise ValueError(f"expert {e}: trajectory shape {traj.shape} != "
                                     f"{(epochs + 1, num_params)}")
                ds[e] = traj.astype(DTYPES[dtype], copy=False)
                written += 1
            if written != experts:
                raise ValueError(f"{written} trajectories written, {experts} expected")
            for key, value in attrs.items():
                f.attrs[key] = json.dumps(value) if key in JSON_ATTRS else value


class ExpertStore:
    """Lazy reader: each :meth:`params` call reads one (expert, epoch) row."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self.file = h5py.File(self.path, "r")
            self.data = self.file["params"]
        except (OSError, KeyError) as err:
            raise InputError("distill", self.path, f"not an expert-trajectory store ({err}); "
                             "rebuild it with rule buffer_experts") from None
        self.attrs = {k: json.loads(v) if k in JSON_ATTRS else v for k, v in self.file.attrs.items()}
        self.experts, snapshots, self.num_params = self.data.shape
        self.epochs = snapshots - 1

    @property
    def key(self) -> str:
        return str(self.attrs["key"])

    def params(self, expert: int, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Expert ``expert``'s flat parameters after ``epoch`` epochs (0: its initialisation),
        as float32 on ``device``."""
        if not (0 <= expert < self.experts and 0 <= epoch <= self.epochs):
            raise IndexError(f"{self.path}: no expert {expert} epoch {epoch} (store holds "
                             f"{self.experts} experts x epochs 0..{self.epochs})")
        return torch.from_numpy(self.data[expert, epoch].astype(np.float32)).to(device)

    def build_net(self, device: torch.device | str = "cpu") -> nn.Module:
        """A network of the experts' architecture (its initial weights are arbitrary)."""
        a = self.attrs
        return models.build(a["net"], int(a["num_classes"]), int(a["im_size"]),
                            **a["net_kwargs"]).to(device)

    def load_into(self, net: nn.Module, expert: int, epoch: int) -> nn.Module:
        """Copy one stored point into ``net``'s parameters (bit-exact for float32 stores)."""
        names = [n for n, _ in net.named_parameters()]
        if names != self.attrs["param_names"]:
            raise ValueError(f"{self.path}: network parameters {names[:3]}... do not match the "
                             f"store's {self.attrs['param_names'][:3]}...")
        flat = self.params(expert, epoch, next(net.parameters()).device)
        with torch.no_grad():
            nn.utils.vector_to_parameters(flat, net.parameters())
        return net

    def check(self, num_classes: int, im_size: int) -> None:
        """Refuse a store made for other data (one message naming the file)."""
        a = self.attrs
        if int(a["num_classes"]) != num_classes or int(a["im_size"]) != im_size:
            raise InputError("distill", self.path, f"experts were trained for {a['num_classes']} "
                             f"classes at {a['im_size']} px; this dataset has {num_classes} at "
                             f"{im_size} px")

    def close(self) -> None:
        self.file.close()
