"""Privacy audit of a distilled (or selected) set: how close its images come to real training
patches, and whether they let an attacker tell training patches from held-out ones.

Two figures per space (pixels, and the features of an encoder trained in the pipeline):

* **Nearest-real-neighbour distances.** Each synthetic image's distance to its closest real
  training patch, against the same distance from real held-out patches (a seeded sample of the
  val split when the store has one, else the test split) to the training set: held-out patches
  are what "close, but not copied" looks like. ``median_ratio`` is the median synthetic distance
  over the median held-out distance; ``memorised`` is the share of synthetic images at or below
  the ``percentile``-th percentile of the held-out distances (closer to a training patch than
  95 % of unseen real patches are).
* **Membership inference** (distance attack, after GAN-Leaks' black-box attack): each candidate
  real patch is scored by its distance to the nearest synthetic image (closer = "member"); the
  ROC AUC (scikit-learn) separates training patches (members) from held-out patches
  (non-members), with a seeded stratified bootstrap interval. 0.5 means the set says no more
  about the training patches than about unseen ones. Two member sets: ``random`` (as many
  seeded random training patches as held-out ones: the average patient) and ``sources`` (the
  training patches the images were made from, recorded by the distillation: a coreset's picks,
  the real patches a method starts from), the patients most exposed (Carlini et al., "No free
  lunch in 'privacy for free'", 2022). A control, ``null``: the random-member attack with the
  set replaced by as many real held-out patches of the same classes, which the training never
  saw. It is what the attack reads when nothing leaks; it departs from 0.5 when the held-out
  split is not distributed like the training split (other centres, other slides).

Pixel distances are root-mean-square differences of pixels in [0, 1]; feature distances are
Euclidean between L2-normalised features. The training split is streamed from the store in
batches (batched matrix products with running minima): memory holds the synthetic set, the
held-out sample and one batch, whatever the cohort's size.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import zarr
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score
from matplotlib.figure import Figure
from tqdm import tqdm

from histodistill.data.store import SPLITS, PatchStore
from histodistill.data.stream import iterate, read_rows
from histodistill.encoders import Encoder, load_encoder
from histodistill.runtime import device
from histodistill.io import InputError, atomic_path, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditConfig:
    """The ``privacy`` config section's audit settings (defaults: the schema's)."""

    encoder: str | None
    heldout_split: str  # auto: val when the store has val patches, else test
    percentile: float
    samples: int  # held-out patches (and as many random training patches) drawn
    bootstrap: int
    seed: int
    attack_space: str
    grid_pairs: int
    batch: int

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "AuditConfig":
        """From the validated ``privacy`` section (every key present; ``package`` is not the
        audit's)."""
        return cls(**{f.name: cfg[f.name] for f in fields(cls)})


class Space:
    """One space of the audit: vectors of pixels (RMS distance) or of encoder features."""

    def __init__(self, name: str, encoder: Encoder | None, dev: torch.device) -> None:
        self.name, self.encoder, self.dev = name, encoder, dev

    def vectors(self, u8: np.ndarray) -> torch.Tensor:
        """(B, D) float32 vectors of (B, 3, H, W) uint8 images, scaled so that the Euclidean
        distance is the space's distance."""
        x = torch.from_numpy(np.ascontiguousarray(u8)).to(self.dev)
        if self.name == "pixel":  # centred: smaller norms, smaller float32 error in the products
            v = (x.flatten(1).float() - 127.5) / 255
            return v / v.shape[1] ** 0.5
        assert self.encoder is not None  # every space but "pixel" has an encoder
        return torch.nn.functional.normalize(self.encoder.embed(x).float(), dim=1)


def sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(m, n) squared Euclidean distances between rows of ``a`` and ``b`` by one matrix product."""
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T).clamp_min_(0)


def auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """ROC AUC of distance scores (smaller = member): P(member closer than non-member)."""
    y = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    return float(roc_auc_score(y, -np.r_[members, nonmembers]))


def bootstrap_auc(members: np.ndarray, nonmembers: np.ndarray, resamples: int, seed: int,
                  level: float = 0.95) -> list[float]:
    """Percentile interval of the AUC over ``resamples`` stratified bootstrap resamples
    (members and non-members resampled separately, seeded). Vectorised rank statistic:
    AUC = (rank sum of members - n1 (n1 + 1) / 2) / (n1 n0), ties averaged (as sklearn)."""
    rng = np.random.default_rng(seed)
    n1, n0 = len(members), len(nonmembers)
    values = []
    for start in range(0, resamples, 100):  # blocks of resamples: bounded memory
        k = min(100, resamples - start)
        m = members[rng.integers(0, n1, (k, n1))]
        h = nonmembers[rng.integers(0, n0, (k, n0))]
        ranks = rankdata(-np.concatenate([m, h], 1), axis=1)  # higher rank = closer
        values.append((ranks[:, :n1].sum(1) - n1 * (n1 + 1) / 2) / (n1 * n0))
    aucs = np.concatenate(values)
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(aucs, tail)), float(np.percentile(aucs, 100 - tail))]


def heldout_split(store: PatchStore, wanted: str) -> str:
    """The held-out split: ``wanted``, or for ``auto`` val when it has patches, else test."""
    split = store.array("split")
    counts = {s: int((split == i).sum()) for i, s in enumerate(SPLITS)}
    name = ("val" if counts["val"] else "test") if wanted == "auto" else wanted
    if name not in ("val", "test"):
        raise InputError("privacy_audit", "privacy.heldout_split",
                         f"{wanted!r} is not a held-out split; choose auto, val or test")
    if not counts[name]:
        raise InputError("privacy_audit", store.path, f"split {name!r} has no patches to hold out")
    return name


def _members_like(train_rows: np.ndarray, held_rows: np.ndarray, labels: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    """Random training rows with the held-out sample's class counts (as many as the class has),
    so the attack compares members and non-members of the same class mix."""
    picked = []
    for c in np.unique(labels[held_rows]):
        pool = train_rows[labels[train_rows] == c]
        n = min(int((labels[held_rows] == c).sum()), len(pool))
        picked.append(rng.choice(pool, n, replace=False))
    return np.sort(np.concatenate(picked))


def _null_rows(split: np.ndarray, labels: np.ndarray, slides: np.ndarray, held_name: str,
               set_labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The control set: real patches nothing was trained on, with the set's class counts.

    From the other unseen split (test when the held-out split is val) when it has enough; else
    from the held-out split itself, kept apart from the held-out sample: whole slides (seeded
    order, at most half of them) when the store knows its slides, since patches of one slide
    resemble each other, otherwise rows (at most half of each class). Returns the control rows
    and the held-out rows the sample must leave out."""
    other = "test" if held_name == "val" else "val"
    counts = dict(zip(*np.unique(set_labels, return_counts=True)))
    rows = {name: np.flatnonzero(split == SPLITS.index(name)) for name in (other, held_name)}
    if all((labels[rows[other]] == c).sum() >= n for c, n in counts.items()):
        pool, excluded, cap = rows[other], np.zeros(0, np.int64), None
    else:
        held = rows[held_name]
        excluded, cap = np.zeros(0, np.int64), 0.5
        if len(held) and (slides[held] >= 0).all():
            ids = rng.permutation(np.unique(slides[held]))
            for sid in ids[:max(1, len(ids) // 2)]:
                excluded = np.r_[excluded, held[slides[held] == sid]]
                if all((labels[excluded] == c).sum() >= n for c, n in counts.items()):
                    break
            pool, cap = np.sort(excluded), None
        else:
            pool = held
    picked = []
    for c, n in counts.items():
        candidates = pool[labels[pool] == c]
        take = min(int(n), len(candidates) if cap is None else int(len(candidates) * cap))
        picked.append(rng.choice(candidates, take, replace=False))
    null = np.sort(np.concatenate(picked)).astype(np.int64)
    return null, (np.sort(excluded) if len(excluded) else null)


@dataclass
class _Running:
    """Running minima of one space over the streamed training split."""

    syn: torch.Tensor  # (S, D) synthetic vectors
    held: torch.Tensor  # (H, D) held-out vectors
    null: torch.Tensor  # (S0, D) the control set's vectors
    syn_min: torch.Tensor
    syn_arg: np.ndarray  # store row of each synthetic image's nearest training patch
    held_min: torch.Tensor
    member_min: np.ndarray  # each watched training row's squared distance to the set
    member_null: np.ndarray  # ... and to the control set

    @classmethod
    def start(cls, syn: torch.Tensor, held: torch.Tensor, null: torch.Tensor, watched: int
              ) -> "_Running":
        inf = float("inf")
        return cls(syn, held, null, torch.full((len(syn),), inf, device=syn.device),
                   np.full(len(syn), -1, np.int64), torch.full((len(held),), inf, device=syn.device),
                   np.full(watched, np.inf), np.full(watched, np.inf))

    def update(self, x: torch.Tensor, rows: np.ndarray, watch_pos: np.ndarray,
               watch_hit: np.ndarray) -> None:
        d = sq_distances(self.syn, x)  # (S, B)
        best, arg = d.min(1)
        better = best < self.syn_min
        self.syn_min = torch.where(better, best, self.syn_min)
        take = better.cpu().numpy()
        self.syn_arg[take] = rows[arg.cpu().numpy()[take]]
        if watch_hit.any():
            self.member_min[watch_pos[watch_hit]] = d.min(0).values.cpu().numpy()[watch_hit]
            if len(self.null):
                hit = torch.from_numpy(watch_hit).to(x.device)
                near = sq_distances(self.null, x[hit]).min(0).values.cpu().numpy()
                self.member_null[watch_pos[watch_hit]] = near
        self.held_min = torch.minimum(self.held_min, sq_distances(self.held, x).min(1).values)


def _attack(members: np.ndarray, nonmembers: np.ndarray, cfg: AuditConfig, seed: int
            ) -> dict[str, Any]:
    return {"auc": auc(members, nonmembers),
            "ci": bootstrap_auc(members, nonmembers, cfg.bootstrap, seed),
            "members": len(members), "nonmembers": len(nonmembers)}


def audit(distilled: str | os.PathLike, store_path: str | os.PathLike,
          encoder_path: str | os.PathLike | None, cfg: AuditConfig, progress: bool = False
          ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Audit the set at ``distilled`` against the training split of the store.

    Returns the privacy section (JSON-able) and, per space, the closest pairs' images
    (synthetic, nearest training patch) for the grid.
    """
    start = time.perf_counter()
    group = zarr.open_group(str(distilled), mode="r")
    images = group["images"][:]
    sources = group["sources"][:] if "sources" in group else None
    store = PatchStore(store_path)
    if images.shape[1:] != store.group["patches"].shape[1:]:
        raise InputError("privacy_audit", distilled, f"images of shape {images.shape[1:]} cannot "
                         f"be compared with the store's patches {store.group['patches'].shape[1:]}")
    split = store.array("split")
    train_rows = np.flatnonzero(split == SPLITS.index("train"))
    if not len(train_rows):
        raise InputError("privacy_audit", store_path, "the training split has no patches")
    held_name = heldout_split(store, cfg.heldout_split)
    held_all = np.flatnonzero(split == SPLITS.index(held_name))
    rng = np.random.default_rng(cfg.seed)
    labels = store.array("label")
    null_rows, kept_apart = _null_rows(split, labels, store.array("slide"), held_name,
                                       group["labels"][:], rng)
    held_free = np.setdiff1d(held_all, kept_apart)
    held_rows = np.sort(rng.choice(held_free, min(cfg.samples, len(held_free)), replace=False))
    random_members = _members_like(train_rows, held_rows, labels, rng)
    if sources is not None and not np.isin(sources, train_rows).all():
        raise InputError("privacy_audit", distilled, "its 'sources' are not all training rows "
                         f"of {store_path}: it was distilled from another store")
    watched = np.unique(np.r_[random_members, sources if sources is not None else []]).astype(np.int64)

    dev = device()
    spaces = [Space("pixel", None, dev)]
    if encoder_path:
        spaces.append(Space("feature", load_encoder(encoder_path, dev), dev))
    held_pixels, null_pixels = read_rows(store, held_rows), read_rows(store, null_rows)
    run = {s.name: _Running.start(s.vectors(images), s.vectors(held_pixels),
                                  s.vectors(null_pixels), len(watched)) for s in spaces}
    for x, _, rows in tqdm(iterate(store, "train", cfg.batch, None), desc="audit train split",
                           total=-(-len(train_rows) // cfg.batch), disable=not progress):
        pos = np.searchsorted(watched, rows).clip(max=len(watched) - 1)
        hit = watched[pos] == rows
        for s in spaces:
            run[s.name].update(s.vectors(x), rows, pos, hit)

    section: dict[str, Any] = {
        "heldout_split": held_name, "encoder": cfg.encoder if encoder_path else None,
        "n_synthetic": len(images), "n_train": len(train_rows), "n_heldout": len(held_rows),
        "heldout_total": len(held_all), "percentile": cfg.percentile,
        "sources_recorded": sources is not None, "n_null": len(null_rows),
        "null_splits": sorted({SPLITS[i] for i in split[null_rows]}), "spaces": {}}
    members = {"random": random_members}
    if sources is not None:
        members["sources"] = np.unique(sources)
    pairs: dict[str, np.ndarray] = {}
    for i, s in enumerate(spaces):
        section["spaces"][s.name], pairs[s.name] = _summary(
            s, run[s.name], images, store, members, watched, cfg, cfg.seed + 10 * i)
    headline = section["spaces"][cfg.attack_space if encoder_path else "pixel"]["attack"]
    which = "sources" if "sources" in headline else "random"
    section.update({
        "memorised": max(v["memorised"] for v in section["spaces"].values()),
        "attack_auc": headline[which]["auc"], "attack_ci": headline[which]["ci"],
        "attack_members": which, "attack_space": cfg.attack_space if encoder_path else "pixel",
        "seconds": time.perf_counter() - start})
    log.info("audit of %s: memorised %.3f, attack AUC %.3f (%s members, %s space) in %.1fs",
             distilled, section["memorised"], section["attack_auc"], which,
             section["attack_space"], section["seconds"])
    return section, pairs


def _summary(space: Space, r: _Running, images: np.ndarray, store: PatchStore,
             members: dict[str, np.ndarray], watched: np.ndarray, cfg: AuditConfig, seed: int
             ) -> tuple[dict[str, Any], np.ndarray]:
    """One space's figures from its running minima (``members``: member rows per attack), and
    its closest pairs' images (2, k, 3, H, W)."""
    syn_d = _exact(space, images, store, r.syn_arg)  # exact zeros for copies
    held_d = r.held_min.sqrt().cpu().numpy().astype(np.float64)
    nonmember_d = sq_distances(r.syn, r.held).min(0).values.sqrt().cpu().numpy()
    watched_d = np.sqrt(r.member_min)
    threshold = float(np.percentile(held_d, cfg.percentile))
    memorised = syn_d <= threshold
    attack = {name: _attack(watched_d[np.searchsorted(watched, rows)], nonmember_d, cfg, seed + k)
              for k, (name, rows) in enumerate(members.items())}
    if len(r.null):  # the control: the random members against a set of unseen real patches
        null_nonmember = sq_distances(r.null, r.held).min(0).values.sqrt().cpu().numpy()
        null_member = np.sqrt(r.member_null[np.searchsorted(watched, members["random"])])
        attack["null"] = _attack(null_member, null_nonmember, cfg, seed + len(members))
    order = np.argsort(syn_d, kind="stable")[:cfg.grid_pairs]
    summary = {
        "synthetic_median": float(np.median(syn_d)), "heldout_median": float(np.median(held_d)),
        "median_ratio": float(np.median(syn_d) / max(np.median(held_d), 1e-12)),
        "threshold": threshold, "memorised": float(memorised.mean()),
        "memorised_count": int(memorised.sum()), "attack": attack,
        "closest": [{"synthetic": int(j), "train_row": int(r.syn_arg[j]),
                     "distance": float(syn_d[j]), "memorised": bool(memorised[j])} for j in order]}
    return summary, np.stack([images[order], read_rows(store, r.syn_arg[order])])


def _exact(space: Space, images: np.ndarray, store: PatchStore, rows: np.ndarray) -> np.ndarray:
    """Each synthetic image's distance to its nearest training patch, recomputed in float64
    from the pair itself (the matrix-product form leaves float32 residue where copies are 0)."""
    near = read_rows(store, rows)
    a, b = space.vectors(images).double(), space.vectors(near).double()
    return (a - b).norm(dim=1).cpu().numpy()


def save_pairs_grid(pairs: dict[str, np.ndarray], section: dict[str, Any], class_names: list[str],
                    labels: np.ndarray, out: str | os.PathLike) -> None:
    """The closest pairs of each space as a PNG: synthetic image above its nearest real training
    patch, distance (and M in red when memorised) beneath, closest first."""
    k = max(p.shape[1] for p in pairs.values())
    fig = Figure(figsize=(max(1.0 * k + 0.8, 6.5), 2.7 * len(pairs)))
    for sub, (name, pair) in zip(fig.subfigures(len(pairs), 1, squeeze=False)[:, 0], pairs.items()):
        info = section["spaces"][name]
        sub.suptitle(f"{name} space: memorised {info['memorised']:.2f} (M: distance <= "
                     f"{info['threshold']:.3g}, the {section['percentile']:g}th percentile of "
                     f"held-out patches)", fontsize=8)
        axes = sub.subplots(2, k, squeeze=False)
        for j in range(k):
            top, bottom = axes[0, j], axes[1, j]
            for ax in (top, bottom):
                ax.set_xticks([])
                ax.set_yticks([])
            if j >= pair.shape[1]:
                top.axis("off")
                bottom.axis("off")
                continue
            c = info["closest"][j]
            top.imshow(pair[0, j].transpose(1, 2, 0))
            bottom.imshow(pair[1, j].transpose(1, 2, 0))
            top.set_title(class_names[int(labels[c["synthetic"]])], fontsize=7)
            bottom.set_xlabel(f"{c['distance']:.3g}" + (" M" if c["memorised"] else ""), fontsize=7,
                              color="red" if c["memorised"] else "black")
        axes[0, 0].set_ylabel("synthetic", fontsize=7)
        axes[1, 0].set_ylabel("nearest\ntraining", fontsize=7)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def privacy_audit(distilled: str | os.PathLike, store_path: str | os.PathLike,
                  encoder_path: str | os.PathLike | None, *, cfg: dict[str, Any],
                  out_json: str | os.PathLike, out_grid: str | os.PathLike) -> dict[str, Any]:
    """Rule ``privacy_audit``: audit one distilled set, write its privacy section and the
    closest-pairs grid."""
    config = AuditConfig.from_config(cfg)
    section, pairs = audit(distilled, store_path, encoder_path, config, progress=True)
    section["settings"] = cfg
    group = zarr.open_group(str(distilled), mode="r")
    save_pairs_grid(pairs, section, list(group.attrs["class_names"]), group["labels"][:], out_grid)
    write_json(out_json, section)
    return section


