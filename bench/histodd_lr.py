"""Histo-DD's image learning rate on real tissue: accuracy and saturation per lr_img against random.

Usage: python bench/histodd_lr.py [--dataset pcam] [--lrs 0.5 0.05] [--outer 20] [--inner 100]
                                  [--epochs 1000] [--out DIR]

Needs the dataset's store, template and full-data result (`make pcam` builds PCam's: real
Camelyon16 tissue, not shipped; `make demo` the demo's); skipped with a message when missing.
With the dataset's settings from config.yaml, in one run: the pool,
Histo-DD once per lr_img (K=--outer, U=--inner), random real patches, each evaluated with
the dataset's evaluation settings at --epochs. Prints one `name: value` line per figure; the image grids
and the full results go to --out (default results/bench/histodd_lr_<dataset>). Minutes per lr
on a GPU at the defaults; hours on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from histodistill import config
from histodistill.distill.run import distill, pretrain_pool
from histodistill.evaluate import evaluate_distilled
from histodistill.io import save_figures

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="pcam")
    parser.add_argument("--results", default=str(ROOT / "results"),
                        help="folder holding <dataset>/patches.zarr, stain/ and full/")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.5, 0.05])
    parser.add_argument("--outer", type=int, default=20)
    parser.add_argument("--inner", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=1000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    base = Path(args.results) / args.dataset
    store, template, full = base / "patches.zarr", base / "stain/template.json", base / "full/convnet.json"
    if not all(p.exists() for p in (store, template, full)):
        sys.exit(f"histodd_lr: {store} (or its template / full-data ConvNet result) is missing; "
                 "build the dataset first (`make pcam` needs ../shared/data/pcam)")
    ds = args.dataset
    cfg = config.load(ROOT / "config.yaml")
    d_cfg = config.section(cfg, ds, "distill")
    e_cfg = config.section(cfg, ds, "evaluate")
    e_cfg["train"]["epochs"] = args.epochs
    seed = int(d_cfg["seed"])
    out = Path(args.out or ROOT / f"results/bench/histodd_lr_{ds}")
    out.mkdir(parents=True, exist_ok=True)
    runs = {f"histodd_lr{lr:g}": ("histodd", {**config.method_config(cfg, ds, "histodd", 10),
                                             "lr_img": lr, "outer_loop": args.outer,
                                             "inner_loop": args.inner}) for lr in args.lrs}
    runs["random"] = ("random", config.method_config(cfg, ds, "random", 10))
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        pool = f"{tmp}/pool.pt"
        pretrain_pool(store, template, pool, d_cfg["pool"], seed, d_cfg["cache_mb"])
        for name, (method, m_cfg) in runs.items():
            distill(store, template, pool if method == "histodd" else None, method, 10,
                    m_cfg, seed, f"{tmp}/{name}.zarr", out / f"{name}.png", f"{tmp}/{name}_cost.json",
                    None, d_cfg["cache_mb"], progress=False)
            r = evaluate_distilled(f"{tmp}/{name}.zarr", f"{tmp}/{name}_cost.json", store,
                                   template, {"convnet": full}, e_cfg, ds,
                                   out / f"{name}.json")
            acc = r["patch"]["convnet"]["acc"]
            summary[name] = {"acc": acc["mean"], "std": acc["std"], "saturated": r["saturated_fraction"],
                             "distill_s": r["distill"]["seconds"], "device": r["distill"]["device"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    rand = summary["random"]["acc"]
    figures = [f"{n}_acc: {s['acc'] * 100:.1f}" for n, s in summary.items()]
    figures += [f"{n}_saturated_pct: {s['saturated'] * 100:.2f}" for n, s in summary.items() if n != "random"]
    figures += [f"{n}_gain_over_random: {(s['acc'] - rand) * 100:.1f}" for n, s in summary.items()
                if n != "random"]
    save_figures(figures, out / "figures.txt")


if __name__ == "__main__":
    main()
