"""Trajectory matching's image learning rate: accuracy and saturation of mtt and ptm per lr_img
against random real patches.

Usage: python bench/trajectory_lr.py [--dataset demo_patches] [--ipc 2] [--lrs 1000 100]
                                     [--out DIR]

Needs the dataset's store, template, full-data result and expert buffer (e.g.
`snakemake --cores 2 results/demo_patches/mtt_ipc2.json` builds them); stops with a message when
one is missing. With the dataset's settings from config.yaml, in one run: mtt and ptm once per
lr_img and random real patches, each evaluated with the dataset's evaluation settings. Prints one
`name: value` line per figure; the image grids and the full results go to --out (default
results/bench/trajectory_lr_<dataset>). About 15 minutes per run on 2 idle CPU cores at the
pre-tiled demo's profile.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from histodistill import config
from histodistill.distill.run import distill
from histodistill.evaluate import evaluate_distilled
from histodistill.io import save_figures

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="demo_patches")
    parser.add_argument("--results", default=str(ROOT / "results"),
                        help="folder holding <dataset>/patches.zarr, stain/, full/ and experts/")
    parser.add_argument("--ipc", type=int, default=2)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1000.0, 100.0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    ds = args.dataset
    cfg = config.load(ROOT / "config.yaml")
    base = Path(args.results) / ds
    experts = base / "experts" / f"{config.section(cfg, ds, 'trajectories')['net']}.h5"
    store, template, full = base / "patches.zarr", base / "stain/template.json", base / "full/convnet.json"
    missing = [str(p) for p in (store, template, full, experts) if not p.exists()]
    if missing:
        sys.exit(f"trajectory_lr: {', '.join(missing)} missing; build the dataset's mtt target first")
    d_cfg = config.section(cfg, ds, "distill")
    e_cfg = config.section(cfg, ds, "evaluate")
    seed = int(d_cfg["seed"])
    out = Path(args.out or ROOT / f"results/bench/trajectory_lr_{ds}")
    out.mkdir(parents=True, exist_ok=True)
    runs = {f"{m}_lr{lr:g}": (m, {**config.method_config(cfg, ds, m, args.ipc), "lr_img": lr})
            for m in ("mtt", "ptm") for lr in args.lrs}
    runs["random"] = ("random", config.method_config(cfg, ds, "random", args.ipc))
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (method, m_cfg) in runs.items():
            distill(store, template, None, method, args.ipc, m_cfg, seed, f"{tmp}/{name}.zarr",
                    out / f"{name}.png", f"{tmp}/{name}_cost.json", None, d_cfg["cache_mb"],
                    progress=False, experts=experts if method != "random" else None)
            r = evaluate_distilled(f"{tmp}/{name}.zarr", f"{tmp}/{name}_cost.json", store,
                                   template, {"convnet": full}, e_cfg, ds, out / f"{name}.json")
            acc = r["patch"]["convnet"]["acc"]
            summary[name] = {"acc": acc["mean"], "std": acc["std"],
                             "saturated": r["saturated_fraction"],
                             "distill_s": r["distill"]["seconds"], "device": r["distill"]["device"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    rand = summary["random"]["acc"]
    figures = [f"{n}_acc: {s['acc'] * 100:.1f}" for n, s in summary.items()]
    figures += [f"{n}_std: {s['std'] * 100:.1f}" for n, s in summary.items()]
    figures += [f"{n}_saturated_pct: {s['saturated'] * 100:.2f}" for n, s in summary.items()
                if n != "random"]
    figures += [f"{n}_gain_over_random: {(s['acc'] - rand) * 100:.1f}" for n, s in summary.items()
                if n != "random"]
    save_figures(figures, out / "figures.txt")


if __name__ == "__main__":
    main()
