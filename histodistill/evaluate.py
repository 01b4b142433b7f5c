"""Training and testing patch classifiers: metrics, the InfoDist boundary loss, train loops.

The same loop trains pool networks, coreset feature networks, networks on distilled sets and
the full-data upper bound, so every number is produced the same way. The protocol is the DC/DSA
reference's ``evaluate_synset``: normalised inputs, per-image augmentation, SGD (momentum 0.9,
weight decay 5e-4), learning rate x0.1 at half. Real splits are streamed from the patch store in
batches (:func:`histodistill.data.iterate`); only distilled sets, which are small, sit in memory.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from tqdm import tqdm

from histodistill import models
from histodistill.augment import Augment, AugmentConfig
from histodistill.data.real import Stats
from histodistill.data.stream import iterate
from histodistill.io import read_json, settings_hash, write_json
from histodistill.stain import MacenkoNormaliser, StainTemplate
from histodistill.data.store import PatchStore, fingerprint
from histodistill.state import load_resume, save_state

log = logging.getLogger(__name__)
METRICS = ("acc", "f1", "auc", "sensitivity", "specificity")
# One epoch of training batches: (normalised images, labels, store rows or None)
Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]]


def device() -> torch.device:
    """CUDA when present, else CPU (the same code path)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def metrics(y_true: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """Accuracy, macro F1, one-vs-rest AUC, sensitivity and specificity (scikit-learn).

    ``prob`` is (N, C) class probabilities. Binary: AUC of the positive class (index 1),
    sensitivity its recall and specificity the negative class's recall. Multi-class: macro
    averages over classes present in ``y_true`` (one-vs-rest AUC, per-class recall and
    TN / (TN + FP)).
    """
    # imported here: scikit-learn costs a second to import, in every job that imports this module
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

    y_true = np.asarray(y_true)
    n_classes = prob.shape[1]
    labels = list(range(n_classes))
    pred = prob.argmax(1)
    cm = confusion_matrix(y_true, pred, labels=labels).astype(np.float64)
    tp = np.diag(cm)
    fn, fp = cm.sum(1) - tp, cm.sum(0) - tp
    tn = cm.sum() - tp - fn - fp
    present = cm.sum(1) > 0
    sens = tp / np.maximum(tp + fn, 1)
    spec = tn / np.maximum(tn + fp, 1)
    if n_classes == 2:
        auc = roc_auc_score(y_true, prob[:, 1]) if present.all() else float("nan")
        sensitivity, specificity = sens[1], spec[1]
    else:
        seen = [c for c in labels if present[c]]
        auc = (roc_auc_score(y_true, prob[:, seen] / prob[:, seen].sum(1, keepdims=True),
                             multi_class="ovr", average="macro", labels=seen)
               if len(seen) > 1 else float("nan"))
        sensitivity, specificity = sens[present].mean(), spec[present].mean()
    return {"acc": float(accuracy_score(y_true, pred)),
            "f1": float(f1_score(y_true, pred, average="macro", labels=labels, zero_division=0)),
            "auc": float(auc), "sensitivity": float(sensitivity), "specificity": float(specificity)}


def boundary_loss(logits: torch.Tensor, y: torch.Tensor, rho: float, tau: float) -> torch.Tensor:
    """InfoDist's boundary loss, summed over classes.

    For class c with probabilities p = softmax(logits)[:, c]: the positive boundary b_p is the
    last of the top ceil(B*rho) positives sorted descending (B positives), b_n = b_p - tau;
    L_c = sum_pos |min(p_i - b_p, 0)| + sum_neg |max(p_j - b_n + tau, 0)|.
    """
    prob = logits.softmax(1)
    total = logits.new_zeros(())
    for c in range(logits.shape[1]):
        pos, neg = prob[y == c, c], prob[y != c, c]
        if len(pos) == 0:
            continue
        ranked = pos.sort(descending=True).values
        top = max(int(np.ceil(len(pos) * rho)), 1)
        b_p = ranked[min(top, len(pos)) - 1].detach()
        b_n = b_p - tau
        total = total + (pos - b_p).clamp(max=0).abs().sum() + (neg - b_n + tau).clamp(min=0).abs().sum()
    return total


@dataclass
class TrainConfig:
    """Optimisation settings (DC's evaluation protocol by default: SGD, lr x0.1 at half)."""

    epochs: int = 1000
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch: int = 256
    schedule: str = "step"  # "step" (x0.1 at half), "cosine" or "constant"
    boundary: dict[str, float] = field(default_factory=dict)  # {"weight", "rho", "tau"} or {}
    # sharpness-aware minimisation (Foret et al. 2021; FTD's flat expert trajectories): each step
    # takes the gradient at the weights moved sam_rho along the normalised gradient (0: plain)
    sam_rho: float = 0.0

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "TrainConfig":
        return cls(**{k: v for k, v in cfg.items() if k in cls.__dataclass_fields__})


def tensor_batches(x: torch.Tensor, y: torch.Tensor, batch: int, gen: torch.Generator) -> Batches:
    """Shuffled batches of an in-memory set (normalised images), a fresh order every epoch."""

    def epoch(_: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            yield x[idx.to(x.device)], y[idx.to(y.device)], idx

    return epoch


def scheduler(opt: torch.optim.Optimizer, schedule: str, epochs: int
              ) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch learning-rate schedule: "step" (x0.1 at half), "cosine" or "constant"."""
    if schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(opt, [max(1, epochs // 2)], 0.1)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


class EpochCheckpoint:
    """Resume a training loop at an epoch boundary: network, optimiser, schedule, the loop's
    generator and the global torch RNG, the epoch times and curve so far. A checkpoint written
    under another ``key`` (other settings or inputs) is ignored."""

    def __init__(self, path: str | os.PathLike | None, key: str) -> None:
        self.path, self.key = (Path(path) if path else None), key

    def load(self, objs: dict[str, Any], gen: torch.Generator) -> dict[str, Any] | None:
        """Restore ``objs`` (name -> object with load_state_dict) and ``gen``; the saved extras,
        or None when there is nothing to resume."""
        state = load_resume(self.path, self.key)
        if state is None:
            return None
        for name, obj in objs.items():
            obj.load_state_dict(state[name])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        log.info("resuming training from %s (epoch %d)", self.path, state["extra"]["epoch"])
        return state["extra"]

    def save(self, objs: dict[str, Any], gen: torch.Generator, **extra: Any) -> None:
        if self.path is None:
            return
        state = {name: obj.state_dict() for name, obj in objs.items()}
        state.update(key=self.key, gen=gen.get_state(), torch_rng=torch.get_rng_state(),
                     extra=extra)
        save_state(state, self.path)

    def remove(self) -> None:
        if self.path is not None and self.path.exists():
            self.path.unlink()


def sam_gradient(net: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], rho: float) -> None:
    """Replace the gradients in ``net`` (of its loss at w) by SAM's: the gradient of
    ``loss_fn()`` at w + rho * g / ||g||, the weights then restored. The optimiser's step then
    descends towards flat minima (FTD trains its experts so, for flat trajectories)."""
    params = [p for p in net.parameters() if p.grad is not None]
    norm = torch.norm(torch.stack([p.grad.norm() for p in params])).clamp_min(1e-12)
    moves = []
    with torch.no_grad():
        for p in params:
            e = p.grad * (rho / norm)
            p.add_(e)
            moves.append(e)
    net.zero_grad(set_to_none=True)
    loss_fn().backward()
    with torch.no_grad():
        for p, e in zip(params, moves):
            p.sub_(e)


def train(net: torch.nn.Module, batches: Batches, cfg: TrainConfig, gen: torch.Generator,
          aug: Augment | None = None, on_epoch: Any = None, progress: bool = False,
          curve: dict[str, list[float]] | None = None,
          checkpoint: EpochCheckpoint | None = None) -> list[float]:
    """Train ``net`` in place on ``batches(epoch)``; returns seconds per epoch.

    Augmentation draws parameters per image. ``on_epoch(epoch, rows, correct)`` is called after
    each epoch with the rows seen and whether the network classified each correctly when it was
    presented (forgetting uses it). ``curve`` gets each epoch's mean training loss and accuracy
    appended under "loss" and "acc" (the report's training curves). With ``checkpoint`` the
    loop saves after every epoch and resumes from there (not with ``on_epoch``, whose caller
    holds state of its own).
    """
    if checkpoint is not None and on_epoch is not None:
        raise ValueError("train: a checkpointed loop cannot also report epochs to on_epoch")
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = scheduler(opt, cfg.schedule, cfg.epochs)
    objs = {"net": net, "opt": opt, "sched": sched}
    times: list[float] = []
    first = 0
    resumed = checkpoint.load(objs, gen) if checkpoint is not None else None
    if resumed is not None:
        first, times = resumed["epoch"], resumed["times"]
        if curve is not None:
            curve.update(resumed["curve"])
    net.train()
    for epoch in tqdm(range(first, cfg.epochs), desc="epochs", disable=not progress, leave=False,
                      initial=first, total=cfg.epochs):
        start = time.perf_counter()
        rows, correct = [], []
        loss_sum, hits, seen = 0.0, 0, 0
        for xb, yb, rb in batches(epoch):
            if aug is not None and aug.enabled:
                xb = aug(xb, gen)
            logits = net(xb)
            loss = F.cross_entropy(logits, yb)
            if cfg.boundary:
                loss = loss + cfg.boundary["weight"] * boundary_loss(
                    logits, yb, cfg.boundary["rho"], cfg.boundary["tau"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.sam_rho > 0:
                sam_gradient(net, lambda: F.cross_entropy(net(xb), yb), cfg.sam_rho)
            opt.step()
            if curve is not None:
                loss_sum += float(loss.detach()) * len(yb)
                hits += int((logits.argmax(1) == yb).sum())
                seen += len(yb)
            if on_epoch is not None:
                rows.append(rb.cpu())
                correct.append((logits.argmax(1) == yb).cpu())
        sched.step()
        times.append(time.perf_counter() - start)
        if curve is not None:
            curve.setdefault("loss", []).append(loss_sum / max(seen, 1))
            curve.setdefault("acc", []).append(hits / max(seen, 1))
        if on_epoch is not None:
            on_epoch(epoch, torch.cat(rows), torch.cat(correct))
        if checkpoint is not None:
            checkpoint.save(objs, gen, epoch=epoch + 1, times=times, curve=curve or {})
    return times


@torch.no_grad()
def predict(net: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor, Any]]
            ) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, C) and labels (N,) over batches of normalised images."""
    net.eval()
    probs, labels = [], []
    for xb, yb, _ in batches:
        probs.append(net(xb).softmax(1).cpu())
        labels.append(yb.cpu())
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


class Inputs:
    """Store patches as evaluation networks see them: optionally stain-normalised to the
    dataset's template (Histo-DD's test-time default), then channel-normalised."""

    def __init__(self, store: PatchStore, template: StainTemplate | None, stain_norm: bool,
                 dev: torch.device, buffer_mb: float = 1024) -> None:
        self.store, self.dev, self.buffer_mb = store, dev, buffer_mb
        self.stats = Stats.from_store(store)
        if stain_norm and template is None:
            raise ValueError("evaluate.stain_norm needs the dataset's stain template")
        self.stain = MacenkoNormaliser(template).to(dev) if stain_norm else None

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float pixels (on any device) to network inputs on the device."""
        x = pixels.to(self.dev)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x
        if self.stain is not None:
            with torch.no_grad():
                x = self.stain(x)
        return self.stats.normalise(x)

    def split(self, split: str, batch: int, seed: int | None = None
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One streamed pass over a split (store order when ``seed`` is None)."""
        for x, y, rows in iterate(self.store, split, batch, seed, self.buffer_mb):
            yield self(torch.from_numpy(x)), torch.from_numpy(y).to(self.dev), torch.from_numpy(rows)

    def split_batches(self, split: str, batch: int, seed: int) -> Batches:
        """Training batches over a split, reshuffled every epoch (seeded)."""
        return lambda epoch: self.split(split, batch, seed * 100003 + epoch)


def summarise_runs(runs: list[dict[str, float]], epoch_times: list[float],
                   curves: list[dict[str, list[float]]] | None = None) -> dict[str, Any]:
    """Mean, std and per-run values of each metric, the mean seconds per epoch, and (when
    given) the training curves (loss and accuracy per epoch) averaged over runs."""
    out: dict[str, Any] = {}
    for key in METRICS:
        values = [r[key] for r in runs]
        out[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "runs": values}
    out["epoch_time_s"] = float(np.mean(epoch_times))
    out["train_time_s"] = float(np.sum(epoch_times) / max(len(runs), 1))
    if curves is not None:
        out["curve"] = {key: np.mean([c[key] for c in curves], axis=0).tolist()
                        for key in ("loss", "acc")}
    return out


def evaluate_arch(arch: str, arch_kwargs: dict[str, Any], batches: Callable[[torch.Generator], Batches],
                  inputs: Inputs, im_size: int, num_classes: int, cfg: TrainConfig, runs: int,
                  seed: int, aug: Augment | None, checkpoint: EpochCheckpoint | None = None,
                  split: str = "test") -> dict[str, Any]:
    """Train ``arch`` ``runs`` times (seeds seed, seed+1, ...) on ``batches(gen)`` and test each
    on the real ``split`` (``val`` when settings are being chosen). ``checkpoint`` makes a single
    run resumable per epoch."""
    if checkpoint is not None and runs != 1:
        raise ValueError("evaluate_arch: a checkpoint resumes a single training run")
    results, times, curves = [], [], []
    for run in tqdm(range(runs), desc=f"{arch} runs", disable=runs == 1):
        gen = torch.Generator().manual_seed(seed + run)
        torch.manual_seed(seed + run)
        net = models.build(arch, num_classes, im_size, **arch_kwargs).to(inputs.dev)
        curves.append({})
        times += train(net, batches(gen), cfg, gen, aug, progress=runs == 1, curve=curves[-1],
                       checkpoint=checkpoint)
        prob, y = predict(net, inputs.split(split, 512))
        if len(y) == 0:
            raise ValueError(f"{inputs.store.path} has no {split} split to evaluate on")
        results.append(metrics(y, prob))
        log.info("%s run %d/%d: acc %.4f, auc %.4f (%.1fs)", arch, run + 1, runs,
                 results[-1]["acc"], results[-1]["auc"], sum(times[-cfg.epochs:]))
    return summarise_runs(results, times, curves)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("histodistill", "torch", "torchvision", "numpy", "zarr", "scikit-learn",
                 "openslide-python", "snakemake"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _setup(store_path: str | os.PathLike, template_path: str | os.PathLike | None,
           cfg: dict[str, Any]) -> tuple[PatchStore, Inputs, Augment]:
    store = PatchStore(store_path)
    template = StainTemplate.load(template_path) if template_path else None
    inputs = Inputs(store, template, bool(cfg["stain_norm"]), device(),
                    float(cfg.get("cache_mb", 1024)))
    aug = Augment(AugmentConfig.from_config(cfg.get("augment", {})), template,
                  inputs.stats.mean, inputs.stats.std)
    return store, inputs, aug


def full_train(store_path: str | os.PathLike, template_path: str | os.PathLike | None, arch: str,
               cfg: dict[str, Any], out: str | os.PathLike,
               checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """The upper bound: ``arch`` trained once on the whole real training split (streamed),
    resumable per epoch from ``checkpoint``."""
    store, inputs, aug = _setup(store_path, template_path, cfg)
    train_cfg = TrainConfig.from_config(cfg["full"])
    seed = int(cfg["seed"])
    settings = {k: v for k, v in cfg.items() if k != "cache_mb"}
    ckpt = EpochCheckpoint(checkpoint, settings_hash([arch, settings, fingerprint(store, template_path)]))
    result = evaluate_arch(arch, cfg.get("arch_kwargs", {}).get(arch, {}),
                           lambda gen: inputs.split_batches("train", train_cfg.batch, seed),
                           inputs, int(store.attrs["patch_size"]), len(store.class_names),
                           train_cfg, 1, seed, aug, ckpt)
    result["epochs"] = train_cfg.epochs
    write_json(out, result)
    ckpt.remove()
    return result


def saturated_fraction(images: np.ndarray) -> float:
    """Share of pixels (N, 3, H, W uint8) at 0 or 255 in any channel."""
    return float(((images == 0) | (images == 255)).any(1).mean())


def train_on_set(images: np.ndarray, labels: np.ndarray, store_path: str | os.PathLike,
                 template_path: str | os.PathLike | None, cfg: dict[str, Any],
                 split: str = "test") -> dict[str, dict[str, Any]]:
    """Train every configured architecture (``archs`` and ``extra_archs``) ``runs`` times on a
    distilled set (uint8 images, labels) and test each on the real ``split``; per-architecture
    summaries (:func:`summarise_runs`)."""
    store, inputs, aug = _setup(store_path, template_path, cfg)
    syn_x = inputs(torch.from_numpy(images))
    syn_y = torch.from_numpy(labels).to(inputs.dev)
    train_cfg = TrainConfig.from_config({**cfg["train"], "boundary": cfg.get("boundary", {})})
    archs = [*cfg["archs"], *[a for a in cfg.get("extra_archs", []) if a not in cfg["archs"]]]
    return {arch: evaluate_arch(arch, cfg.get("arch_kwargs", {}).get(arch, {}),
                                lambda gen: tensor_batches(syn_x, syn_y, train_cfg.batch, gen),
                                inputs, int(images.shape[-1]), len(store.class_names), train_cfg,
                                int(cfg["runs"]), int(cfg["seed"]), aug, split=split)
            for arch in archs}


def set_record(distilled: str | os.PathLike, distill_stats: str | os.PathLike,
               store_path: str | os.PathLike, template_path: str | os.PathLike | None,
               cfg: dict[str, Any], split: str = "test") -> dict[str, Any]:
    """What every evaluation of a distilled set records: each architecture trained on it and
    tested on the real ``split`` (cross-architecture figure with ``extra_archs``), its saturated
    share, the distillation's cost file and the settings; with ``both_protocols``, the same
    under the other stain protocol (``other_protocol``)."""
    group = zarr.open_group(str(distilled), mode="r")
    attrs = dict(group.attrs)
    images, labels = group["images"][:], group["labels"][:]

    def figures(protocol: dict[str, Any]) -> dict[str, Any]:
        patch = train_on_set(images, labels, store_path, template_path, protocol, split=split)
        out = {"stain_norm": bool(protocol.get("stain_norm", False)), "patch": patch}
        if protocol.get("extra_archs"):
            out["cross_arch"] = cross_arch(patch, attrs["config"].get("net"))
        return out

    record = {"method": attrs["method"], "ipc": attrs["ipc"], "split": split, **figures(cfg),
              "saturated_fraction": saturated_fraction(images),
              "distill": read_json(distill_stats, "evaluate"),
              "config": {"distill": attrs["config"], "evaluate": cfg, "seed": attrs["seed"]}}
    if cfg.get("both_protocols"):
        record["other_protocol"] = figures({**cfg, "stain_norm": not cfg.get("stain_norm", False)})
    return record


def evaluate_distilled(distilled: str | os.PathLike, distill_stats: str | os.PathLike,
                       store_path: str | os.PathLike, template_path: str | os.PathLike | None,
                       full: dict[str, str | os.PathLike], cfg: dict[str, Any], dataset: str,
                       out: str | os.PathLike) -> dict[str, Any]:
    """Train every configured architecture on the distilled set, test on the real test split,
    and write the shared result JSON (see docs: "Result files"): :func:`set_record` under the
    method's stain protocol (``cfg['stain_norm']``, resolved per method by the rule), the
    full-data upper bounds and the training-time ratios."""
    record = set_record(distilled, distill_stats, store_path, template_path, cfg)
    full_results, ratio = {}, {}
    for arch in cfg["archs"]:  # upper bounds of the evaluated archs, not of the cross-arch extras
        if arch in full:
            full_results[arch] = read_json(full[arch], "evaluate")
            ratio[arch] = (full_results[arch]["train_time_s"]
                           / max(record["patch"][arch]["train_time_s"], 1e-9))
    result = {"dataset": dataset, **record, "full": full_results, "train_time_ratio": ratio,
              "versions": _versions()}
    write_json(out, result)
    return result


def cross_arch(patch: dict[str, dict[str, Any]], used: str | None) -> dict[str, Any]:
    """GLaD's cross-architecture figure: per metric, the mean over the evaluated architectures
    other than the one the set was distilled with (``used``) of their mean and of their std."""
    others = [a for a in patch if a != used]
    out: dict[str, Any] = {"excluded": used, "archs": others}
    for key in METRICS:
        out[key] = {"mean": float(np.mean([patch[a][key]["mean"] for a in others])),
                    "std": float(np.mean([patch[a][key]["std"] for a in others]))}
    return out
