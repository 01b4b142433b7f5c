"""MIL cost: seconds per training epoch and bag storage, per-slide synthetic bags against the
full real bags.

Usage: python bench/mil.py [--dataset demo] [--bags histodd_ipc10] [--repeats N]

Reads the bags the pipeline wrote (results/<dataset>/bags/<encoder>/{real,<bags>}; build them
with `snakemake results/<dataset>/slide_eval/<bags>.json`). For every model of the dataset's
mil section, one training epoch (its own loss, optimiser and schedule) over the synthetic bags
of the training slides and one over the full real bags, in the same process, interleaved, best
of N; bags are held in memory, so the times are the models' own. Figures: seconds per epoch of
each, ``mil_epoch_ratio_<model>`` = full / synthetic, ``mil_epoch_ratio`` their geometric
mean, and ``storage_ratio`` = synthetic / full bag bytes on disk (``image_storage_ratio``: the
same for the uint8 patches behind the bags).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from histodistill import config
from histodistill.data.store import PatchStore
from histodistill.io import save_figures
from histodistill.mil.train import Bags, bag_storage, train_model

ROOT = Path(__file__).resolve().parent.parent


def epoch_seconds(name: str, cfg: dict, bags: Bags, classes: int, seed: int) -> float:
    """Seconds of one training epoch of a freshly built model (the loop only, as results
    record it)."""
    _, times, _ = train_model(name, {**cfg, "epochs": 1}, bags, classes, seed)
    return times[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("--bags", default="histodd_ipc10", help="<method>_ipc<N> synthetic bags")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = config.mil(config.load(ROOT / "config.yaml"), args.dataset)
    folder = ROOT / "results" / args.dataset / "bags" / cfg["encoder"]
    classes = PatchStore(ROOT / "results" / args.dataset / "patches.zarr").class_names
    syn = Bags(folder / args.bags, classes, "train")
    full = Bags(folder / "real", classes, "train")
    figures, ratios = [], []
    for name in cfg["models"]:
        best = {"syn": np.inf, "full": np.inf}
        for rep in range(args.repeats):
            for kind, bags in (("syn", syn), ("full", full)):
                best[kind] = min(best[kind], epoch_seconds(name, cfg["settings"][name], bags,
                                                           len(classes), rep))
        ratios.append(best["full"] / best["syn"])
        figures += [f"{name}_epoch_s_synthetic: {best['syn']:.4f}",
                    f"{name}_epoch_s_full: {best['full']:.4f}",
                    f"mil_epoch_ratio_{name}: {ratios[-1]:.2f}"]
    s, f = bag_storage(syn), bag_storage(full)
    figures += [f"bags_synthetic: {s['slides']} slides, {s['patches']} patches, {s['bag_gb'] * 1e3:.3f} MB",
                f"bags_full: {f['slides']} slides, {f['patches']} patches, {f['bag_gb'] * 1e3:.3f} MB",
                f"image_storage_ratio: {s['image_gb'] / f['image_gb']:.4f}",
                f"mil_epoch_ratio: {float(np.exp(np.mean(np.log(ratios)))):.2f}",
                f"storage_ratio: {s['bag_gb'] / f['bag_gb']:.4f}"]
    save_figures(figures, ROOT / "results/bench/mil.txt")


if __name__ == "__main__":
    main()
