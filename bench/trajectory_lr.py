"""Trajectory matching's image learning rate: accuracy and saturation of mtt and ptm per lr_img
against random real patches.

Usage: python bench/trajectory_lr.py [--dataset demo_patches] [--ipc 2] [--lrs 1000 100]
                                     [--out DIR]

Needs the dataset's store, template, full-data result and expert buffer (e.g.
`snakemake --cores 2 results/demo_patches/mtt_ipc2.json --configfile configs/demo_patches.yaml`
builds them); stops with a message when one is missing. With the dataset's settings (config.yaml
and its overlay, configs/<dataset>.yaml), in one run: mtt and ptm once per
lr_img and random real patches, each evaluated with the dataset's evaluation settings. Prints one
`name: value` line per figure; the image grids and the full results go to --out (default
results/bench/trajectory_lr_<dataset>), the figures to the file of that name with .txt. About
15 minutes per run on 2 idle CPU cores at the pre-tiled demo's profile.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import ROOT, Dataset, convnet_row, gain_figures, run_set, study_parser  # noqa: E402

from histodistill.io import save_figures  # noqa: E402


def main() -> None:
    parser = study_parser(__doc__, 2, "experts/")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1000.0, 100.0])
    args = parser.parse_args()
    ds = Dataset.load(args.dataset, args.results, "trajectory_lr", experts=True)
    seed = int(ds.section("distill")["seed"])
    out = Path(args.out or ROOT / f"results/bench/trajectory_lr_{ds.name}")
    out.mkdir(parents=True, exist_ok=True)
    runs = {f"{m}_lr{lr:g}": (m, ds.method(m, args.ipc, lr_img=lr))
            for m in ("mtt", "ptm") for lr in args.lrs}
    runs["random"] = ("random", ds.method("random", args.ipc))
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (method, m_cfg) in runs.items():
            s = run_set(ds, name, method, args.ipc, m_cfg, seed, ds.section("evaluate"), out, tmp)
            summary[name] = convnet_row(s)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    figures = gain_figures(summary)
    save_figures(figures, out.parent / f"{out.name}.txt")  # the README block bench:<folder>


if __name__ == "__main__":
    main()
