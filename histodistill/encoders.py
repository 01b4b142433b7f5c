"""Feature encoders for the stages that compare images in a feature space: in-domain FID and
precision/recall of generated patches, InfoDist and centroid selection, the privacy audit's
nearest neighbours, and the feature bags of slide-level MIL.

Nothing is downloaded: encoders are trained inside the pipeline on the real training patches
(rule ``train_encoder``), or loaded from a weights file the user names. Kinds:

* ``supervised``: a classifier of :mod:`histodistill.models` trained with cross-entropy on the
  real training split (streamed, per-image augmentation); features are its penultimate layer.
* ``simclr``: the same backbone trained with SimCLR's NT-Xent loss between two augmented views
  of each patch, as DSMIL trains its patch encoder (ResNet18, a 2-layer projection head to
  256-d, cosine similarity at temperature 0.5, Adam with weight decay 1e-5); features are the
  backbone's output, not the projection.
* ``resnet50_trunc``: CLAM's encoder, torchvision's ResNet50 truncated after ``layer3`` with
  global average pooling (1024-d), inputs normalised with ImageNet statistics, weights read from
  the local file named by ``weights`` (e.g. torchvision's ImageNet checkpoint). Not trained here.
* ``timm``: any architecture of the timm library (``model``, built with ``model_kwargs`` and no
  classifier head; features: its pooled output), with the weights of the local file named by
  ``weights`` (a foundation model such as UNI, CONCH's or Virchow's image tower, or an ImageNet
  network) and the input normalisation they expect (``mean``, ``std``); patches are resized to
  ``input_size`` first when it is set. Not trained here.

Every encoder file holds what is needed to rebuild it and its input normalisation, so consumers
call :func:`load_encoder` and :meth:`Encoder.embed` on pixels and never see the details.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from histodistill import models
from histodistill.augment import Augment, AugmentConfig
from histodistill.data.real import RealData, Stats
from histodistill.data.store import PatchStore, fingerprint
from histodistill.data.stream import iterate
from histodistill.runtime import Compute, Projection, device
from histodistill.state import Checkpoint
from histodistill.training import TrainConfig, loop_state, restore_loop, scheduler, train
from histodistill.io import InputError, settings_hash
from histodistill.state import load_input, save_state

log = logging.getLogger(__name__)
KINDS = ("supervised", "simclr", "resnet50_trunc", "timm")
LOADED = ("resnet50_trunc", "timm")  # kinds read from a weights file, not trained
IMAGENET = Stats((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class ResNet50Trunc(nn.Module):
    """ResNet50 up to ``layer3`` and global average pooling: CLAM's 1024-d patch features."""

    def __init__(self) -> None:
        super().__init__()
        net = models.torchvision_models().resnet50(weights=None)
        self.body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1,
                                  net.layer2, net.layer3, nn.AdaptiveAvgPool2d(1))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(1)


class TimmBackbone(nn.Module):
    """A timm architecture without its classifier head (features: its pooled output), fed
    patches resized to ``input_size`` (bilinear, antialiased) when it is set."""

    def __init__(self, model: str, model_kwargs: dict[str, Any], input_size: int | None) -> None:
        super().__init__()
        import timm  # the timm kind only: importing it costs a second

        self.model = timm.create_model(model, pretrained=False, num_classes=0, **model_kwargs)
        self.input_size = input_size
        self.dim = int(getattr(self.model, "num_features"))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return self.model(x)


@dataclass
class Encoder:
    """A feature network with its input normalisation; ``head`` is the classifier's linear head
    for ``supervised`` encoders (class probabilities for centroid selection), else None."""

    net: models.Classifier | ResNet50Trunc | TimmBackbone
    stats: Stats
    kind: str
    dim: int

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, D) features of uint8 or [0, 1] float (B, 3, H, W) pixels."""
        return self.net.embed(self.stats.normalise(pixels.to(self.device)))

    @torch.no_grad()
    def probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C) class probabilities; only a ``supervised`` encoder is a classifier."""
        if self.kind != "supervised":
            raise ValueError(f"a {self.kind} encoder has no classifier head")
        return self.net(self.stats.normalise(pixels.to(self.device))).softmax(1)


def embed_array(encoder: Encoder, images: np.ndarray, *, batch: int) -> np.ndarray:
    """Features (N, D) float32 of (N, 3, H, W) uint8 images, in batches."""
    out = np.empty((len(images), encoder.dim), dtype=np.float32)
    for s in range(0, len(images), batch):
        out[s:s + batch] = encoder.embed(torch.from_numpy(np.ascontiguousarray(images[s:s + batch]))).cpu().numpy()
    return out


def embed_split(encoder: Encoder, store: PatchStore, split: str, *, batch: int,
                buffer_mb: float = 256, progress: bool = False
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (N, D), labels and store rows of one split, streamed in store order: only the
    features are held, never the split's pixels."""
    feats, labels, rows = [], [], []
    for x, y, r in tqdm(iterate(store, split, batch, None, buffer_mb), desc=f"embed {split}",
                        disable=not progress, leave=False):
        feats.append(encoder.embed(torch.from_numpy(x)).cpu().numpy().astype(np.float32))
        labels.append(y)
        rows.append(r)
    if not feats:
        return np.zeros((0, encoder.dim), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(feats), np.concatenate(labels), np.concatenate(rows)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view's partner is its positive among the 2B - 1 other views, with
    cosine similarities divided by ``temperature``."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    n = len(z1)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)


class _SimCLR(nn.Module):
    """Backbone plus SimCLR's projection head (Linear, ReLU, Linear)."""

    def __init__(self, backbone: models.Classifier, dim: int, out_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone.embed(x))


def _train_simclr(net: models.Classifier, dim: int, real: RealData, cfg: dict[str, Any],
                  aug: Augment, gen: torch.Generator, checkpoint: Checkpoint) -> None:
    """SimCLR on the real training split: two augmented views per patch, NT-Xent, Adam with
    a cosine schedule, under the training's ``compute`` settings; resumable per epoch."""
    tc = TrainConfig.from_config(cfg["train"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg["seed"]) + 1)  # the head's initialisation, seeded too
        model = _SimCLR(net, dim, int(cfg["proj_dim"])).to(real.device)
    compute = Compute.on(model, tc.compute)
    compute.model(model)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = scheduler(opt, tc.schedule, tc.epochs)
    objs = {"model": model, "opt": opt, "sched": sched}
    resumed = checkpoint.load()
    first = 0
    if resumed is not None:
        restore_loop(resumed, objs, gen)
        first = resumed["epoch"]
        log.info("resuming SimCLR from %s (epoch %d)", checkpoint.path, first)

    def project(view: torch.Tensor) -> torch.Tensor:  # the projection under autocast, in float32
        with compute.autocast():
            return model(compute.inputs(view)).float()

    projection = Projection(compute.device_type, "encoders.<name>.train.epochs", tc.epochs - first)
    model.train()
    for epoch in tqdm(range(first, tc.epochs), desc="simclr epochs", initial=first, total=tc.epochs):
        total, steps, start = 0.0, 0, time.perf_counter()
        batches = real.epoch(tc.batch, int(cfg["seed"]) * 100003 + epoch)
        for step, (x, _, _) in enumerate(batches, 1):
            if len(x) < 2:
                continue
            loss = nt_xent(project(aug(x, gen)), project(aug(x, gen)), float(cfg["temperature"]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + float(loss.detach()), steps + 1
            projection.step(step, len(batches), time.perf_counter() - start)
        sched.step()
        projection.epoch(time.perf_counter() - start)
        log.info("simclr epoch %d/%d: loss %.4f", epoch + 1, tc.epochs, total / max(steps, 1))
        checkpoint.save(loop_state(objs, gen, epoch=epoch + 1))


def _build(kind: str, net: str, net_kwargs: dict[str, Any], num_classes: int, im_size: int
           ) -> tuple[models.Classifier | ResNet50Trunc | TimmBackbone, int]:
    """The encoder's network and feature dimension (``timm``: ``net`` is the timm model name,
    ``net_kwargs`` its ``model_kwargs`` and ``input_size``)."""
    if kind == "resnet50_trunc":
        return ResNet50Trunc(), 1024
    if kind == "timm":
        backbone = TimmBackbone(net, net_kwargs["model_kwargs"], net_kwargs["input_size"])
        return backbone, backbone.dim
    model = models.build(net, num_classes, im_size, **net_kwargs)
    return model, int(model.head.in_features)


def train_encoder(store_path: str | os.PathLike, out: str | os.PathLike, cfg: dict[str, Any],
                  *, cache_mb: float, checkpoint: str | os.PathLike | None = None,
                  weights: str | os.PathLike | None = None) -> Encoder:
    """Train (or, for ``resnet50_trunc``, load) the encoder ``cfg`` describes on the store's
    real training split and save it to ``out``. Training resumes from ``checkpoint``."""
    kind = cfg["kind"]
    if kind not in KINDS:
        raise ValueError(f"unknown encoder kind {kind!r}; choose one of {KINDS}")
    store = PatchStore(store_path)
    num_classes, im_size = len(store.class_names), int(store.attrs["patch_size"])
    seed = int(cfg["seed"])
    arch, arch_kwargs = ((cfg["model"], {"model_kwargs": cfg["model_kwargs"],
                                         "input_size": cfg["input_size"]})
                         if kind == "timm" else (cfg["net"], cfg["net_kwargs"]))
    if kind == "timm" and not arch:
        raise InputError("train_encoder", "encoders.<name>.model",
                         "a timm encoder needs the timm architecture name of its weights")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net, dim = _build(kind, arch, arch_kwargs, num_classes, im_size)
    dev = device()
    if kind == "resnet50_trunc":
        stats = IMAGENET
        assert isinstance(net, ResNet50Trunc)  # what _build makes for this kind
        _load_trunc_weights(net, weights)
    elif kind == "timm":
        stats = Stats(tuple(cfg["mean"]), tuple(cfg["std"]))
        assert isinstance(net, TimmBackbone)
        _load_timm_weights(net, weights)
    net = net.to(dev)
    if kind not in LOADED:
        real = RealData(store, "train", cache_mb, seed, dev)
        stats = real.stats
        aug = Augment(AugmentConfig.from_config(cfg["augment"]), None, stats.mean, stats.std)
        gen = torch.Generator().manual_seed(seed)
        ckpt = Checkpoint(checkpoint, settings_hash([cfg, fingerprint(store)]))
        if kind == "supervised":
            tc = TrainConfig.from_config(cfg["train"])
            train(net, lambda epoch: real.epoch(tc.batch, seed * 100003 + epoch), tc, gen, aug,
                  progress=True, checkpoint=ckpt, setting="encoders.<name>.train.epochs")
        else:
            assert isinstance(net, models.Classifier)  # what _build makes for every other kind
            _train_simclr(net, dim, real, cfg, aug, gen, ckpt)
        ckpt.remove()
    encoder = Encoder(net.eval(), stats, kind, dim)
    save_state({"kind": kind, "net": arch, "net_kwargs": arch_kwargs,
                "num_classes": num_classes, "im_size": im_size, "dim": dim,
                "mean": list(stats.mean), "std": list(stats.std), "config": cfg,
                "state": {k: v.cpu() for k, v in net.state_dict().items()}}, out)
    return encoder


def _load_trunc_weights(net: ResNet50Trunc, weights: str | os.PathLike | None) -> None:
    """Load a torchvision ResNet50 state dict into the truncated network (keys of layer4 and
    fc are not needed); a missing or mismatching file is one error naming it."""
    path = _weights_file(weights, "resnet50_trunc needs a local ResNet50 weights file")
    state = _read_weights(path)
    full = models.torchvision_models().resnet50(weights=None)
    try:
        missing, _ = full.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that do not fit
        reason = str(err).splitlines()[-1].strip()
        raise InputError("train_encoder", path, f"not a ResNet50 state dict: {reason}") from None
    needed = [k for k in missing if not k.startswith(("layer4", "fc"))]
    if needed:
        raise InputError("train_encoder", path, f"not a ResNet50 state dict: missing {needed[:3]}")
    net.body.load_state_dict(nn.Sequential(full.conv1, full.bn1, full.relu, full.maxpool, full.layer1,
                                           full.layer2, full.layer3, nn.AdaptiveAvgPool2d(1)).state_dict())


def _weights_file(weights: str | os.PathLike | None, needs: str) -> Path:
    """The user's local weights file; none named (``needs`` says what is needed) or a missing
    file is one error naming the key or the file."""
    if not weights:
        raise InputError("train_encoder", "encoders.<name>.weights", f"{needs} (nothing is downloaded)")
    path = Path(weights)
    if not path.is_file():
        raise InputError("train_encoder", path, "weights file does not exist")
    return path


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file: safetensors, or a torch file read without unpickling
    (``weights_only``); a ``state_dict``/``model`` wrapper is opened."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def _load_timm_weights(net: TimmBackbone, weights: str | os.PathLike | None) -> None:
    """Load the user's weights into the headless timm network: every backbone tensor must be
    in the file with its shape (a classifier head the file carries is left out); a missing or
    mismatching file is one error naming it."""
    path = _weights_file(weights, "a timm encoder needs a local weights file")
    try:
        state = _read_weights(path)
        missing, _ = net.model.load_state_dict(state, strict=False)
    except (RuntimeError, ValueError, OSError) as err:  # shapes that do not fit, not a state dict
        reason = str(err).strip().splitlines()[-1].strip()
        raise InputError("train_encoder", path, f"not weights of this timm model: {reason}") from None
    if missing:
        raise InputError("train_encoder", path,
                         f"not weights of this timm model: missing {sorted(missing)[:3]}")


def load_encoder(path: str | os.PathLike, dev: torch.device | None = None) -> Encoder:
    """The encoder saved by :func:`train_encoder`, in eval mode on ``dev`` (default: CUDA if
    present)."""
    info = load_input(path, "train_encoder")
    net, dim = _build(info["kind"], info["net"], info["net_kwargs"], info["num_classes"],
                      info["im_size"])
    net.load_state_dict(info["state"])
    return Encoder(net.to(dev or device()).eval(), Stats(tuple(info["mean"]), tuple(info["std"])),
                   info["kind"], int(info["dim"]))

