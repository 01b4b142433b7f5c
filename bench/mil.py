"""MIL cost: seconds per training epoch and bag storage, per-slide synthetic bags against the
full real bags.

Usage: python bench/mil.py [--dataset demo] [--bags histodd_ipc10] [--repeats N] [--smoke]

Reads the bags the pipeline wrote (results/<dataset>/bags/<encoder>/{real,<bags>}; build them
with `snakemake results/<dataset>/slide_eval/<bags>.json`). For every model of the dataset's
mil section, one training epoch (its own loss, optimiser and schedule) over the synthetic bags
of the training slides and one over the full real bags, in the same process, interleaved, best
of N; bags are held in memory, so the times are the models' own. Figures: seconds per epoch of
each, ``mil_epoch_ratio_<model>`` = full / synthetic, ``mil_epoch_ratio`` their geometric
mean, and ``storage_ratio`` = synthetic / full bag bytes on disk (``image_storage_ratio``: the
same for the uint8 patches behind the bags). The demo's slides hold 150 patches, where a step's
fixed cost (optimiser, Python) weighs; ``mil_epoch_ratio_at_<N>`` times the same models on
random bags of the same count and width, N patches (Camelyon16 tiled at 1000 per slide) against
the synthetic bags' mean size, to show the ratio at cohort scale.

``--smoke``: a check that the bench still runs (the test suite's), in seconds, without the
pipeline's outputs: bag folders written here in the pipeline's layout (6 training slides of the
dataset's classes, random 32-d features, 40 patches a slide in ``real`` and 4 in the synthetic
bags), every model of the mil section, one repeat, 50 patches at scale; figures go to
results/bench/smoke/mil.txt.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from histodistill import config
from histodistill.data.store import PatchStore
from histodistill.io import save_figures
from histodistill.mil.bags import bag_path, manifest_row, write_bag, write_manifest
from histodistill.mil.train import Bags, bag_storage, train_model

ROOT = Path(__file__).resolve().parent.parent


def epoch_seconds(name: str, cfg: dict, bags: Bags, classes: int, seed: int) -> float:
    """Seconds of one training epoch of a freshly built model (the loop only, as results
    record it)."""
    _, times, _ = train_model(name, {**cfg, "epochs": 1}, bags, classes, seed)
    return times[0]


class RandomBags:
    """In-memory bags of random features with the labels of ``like`` (the training loop reads
    ``labels``, ``dim`` and ``features(i)``)."""

    def __init__(self, like: Bags, patches: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.labels, self.dim = like.labels, like.dim
        self._bags = [torch.randn(patches, like.dim, generator=gen) for _ in range(len(like))]

    def __len__(self) -> int:
        return len(self._bags)

    def features(self, i: int) -> torch.Tensor:
        return self._bags[i]


def best_ratio(name: str, cfg: dict, small: object, large: object, classes: int,
               repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` epoch seconds of ``small`` and ``large`` bags, interleaved."""
    best = [np.inf, np.inf]
    for rep in range(repeats):
        for k, bags in enumerate((small, large)):
            best[k] = min(best[k], epoch_seconds(name, cfg, bags, classes, rep))
    return best[0], best[1]


def smoke_bags(folder: Path, classes: list[str], names: tuple[str, str], slides: int = 6,
               dim: int = 32) -> None:
    """Bag folders ``folder/<names[0]>`` (synthetic: 4 patches a slide) and ``folder/<names[1]>``
    (real: 40) of random features, the same training slides, in the pipeline's layout."""
    rng = np.random.default_rng(0)
    for name, kind, patches in zip(names, ("synthetic", "real"), (4, 40)):
        rows = []
        for k in range(slides):
            slide, label = f"slide_{k:03d}", classes[k % len(classes)]
            write_bag(bag_path(folder / name, slide), rng.standard_normal((patches, dim)),
                      np.full((patches, 2), -1), {"slide": slide, "label": label, "split": "train",
                                                  "centre": 0, "kind": kind, "patch_size": 32})
            rows.append(manifest_row(slide, label, "train", 0, patches))
        write_manifest(folder / name, rows)


def bench(args: argparse.Namespace, cfg: dict, folder: Path, classes: list[str], out: Path) -> None:
    """Time the models on the bags of ``folder`` (``args.bags`` and ``real``); save to ``out``."""
    syn = Bags(folder / args.bags, classes, "train", cache_mb=cfg["cache_mb"])
    full = Bags(folder / "real", classes, "train", cache_mb=cfg["cache_mb"])
    small = RandomBags(syn, round(syn.patches / len(syn)))
    large = RandomBags(syn, args.scale)
    figures, ratios, scaled = [], [], []
    for name in cfg["models"]:
        settings = cfg["settings"][name]
        s_syn, s_full = best_ratio(name, settings, syn, full, len(classes), args.repeats)
        ratios.append(s_full / s_syn)
        s_small, s_large = best_ratio(name, settings, small, large, len(classes), args.repeats)
        scaled.append(s_large / s_small)
        figures += [f"{name}_epoch_s_synthetic: {s_syn:.4f}", f"{name}_epoch_s_full: {s_full:.4f}",
                    f"mil_epoch_ratio_{name}: {ratios[-1]:.2f}",
                    f"mil_epoch_ratio_at_{args.scale}_{name}: {scaled[-1]:.2f}"]
    s, f = bag_storage(syn), bag_storage(full)
    figures += [f"bags_synthetic: {s['slides']} slides, {s['patches']} patches, {s['bag_gb'] * 1e3:.3f} MB",
                f"bags_full: {f['slides']} slides, {f['patches']} patches, {f['bag_gb'] * 1e3:.3f} MB",
                f"image_storage_ratio: {s['image_gb'] / f['image_gb']:.4f}",
                f"mil_epoch_ratio_at_{args.scale}: {float(np.exp(np.mean(np.log(scaled)))):.2f}",
                f"mil_epoch_ratio: {float(np.exp(np.mean(np.log(ratios)))):.2f}",
                f"storage_ratio: {s['bag_gb'] / f['bag_gb']:.4f}"]
    save_figures(figures, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("--bags", default="histodd_ipc10", help="<method>_ipc<N> synthetic bags")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=int, default=1000, help="patches per full bag at scale")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: check the bench runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg_all = config.load(config.CONFIG, *config.overlays(args.dataset))
    cfg = config.mil(cfg_all, args.dataset)
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            classes = list(cfg_all["datasets"][args.dataset]["classes"])
            smoke_bags(Path(tmp), classes, (args.bags, "real"))
            args.repeats, args.scale = 1, 50
            bench(args, cfg, Path(tmp), classes, ROOT / "results/bench/smoke/mil.txt")
    else:
        classes = PatchStore(ROOT / "results" / args.dataset / "patches.zarr").class_names
        bench(args, cfg, ROOT / "results" / args.dataset / "bags" / cfg["encoder"], classes,
              ROOT / "results/bench/mil.txt")


if __name__ == "__main__":
    main()
