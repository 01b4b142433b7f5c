"""GLaD against SLFD over distillation seeds: is SLFD's stochastic module worth its cost here?

Usage: python bench/latent_distill.py [--dataset demo_patches] [--ipc 10] [--seeds 0 1 2]
                                      [--variants glad slfd ...] [--archs convnet] [--runs N]
                                      [--out DIR]

Needs the dataset's store, template, full-data result and the generator's autoencoder (e.g.
`snakemake --cores 2 results/demo_patches/glad_ipc10.json --configfile configs/demo_patches.yaml`
builds them); stops with a message when one is missing. With the dataset's settings (config.yaml
and its overlay, configs/<dataset>.yaml), in one run, for every seed:
  glad        - GLaD (gradient matching through the frozen decoder);
  slfd        - SLFD (GLaD scored by the stochastic low-rank logit module, learned);
  slfd_fixed  - SLFD with the module frozen at its initialisation (lr_module 0): the Monte
                Carlo loss without what the module learns, to tell the two effects apart;
  slfd_no_shift - SLFD whose module learns only the covariance (its mean layer held at zero):
                does the learned shift of the synthetic logits cause the deficit?
Each set is trained on ``--archs`` (default ConvNet, the distillation network; add e.g. vgg11
alexnet for the cross-architecture figure) ``--runs`` times. Prints one `name: value` line per
figure: per variant the mean over seeds of the ConvNet accuracy, the std over seeds, and with
further archs the cross-architecture mean; `slfd_minus_glad` (ConvNet, and `_cross_arch`).
Grids and full results go to --out (default results/bench/latent_distill_<dataset>), the
figures to the file of that name with .txt (the README's block bench:latent_distill_<dataset>). About 3
minutes per set on 2 idle CPU cores at the pre-tiled demo's profile with ConvNet only.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import ROOT, Dataset, run_set, study_parser  # noqa: E402

from histodistill.distill.base import register  # noqa: E402
from histodistill.distill.slfd import SLFD  # noqa: E402
from histodistill.io import save_figures  # noqa: E402
from histodistill.params import evaluate_settings  # noqa: E402



@register("slfd_no_shift")
class NoShiftSLFD(SLFD):
    """SLFD whose module learns the covariance only: its mean layer stays at zero, so the
    synthetic logits are not shifted away from the classifier's."""

    def init_state(self) -> None:
        super().init_state()
        self.head.mean.requires_grad_(False)


# variant -> (method run, method whose configured settings it takes, overrides)
VARIANTS = {"glad": ("glad", "glad", {}), "slfd": ("slfd", "slfd", {}),
            "slfd_fixed": ("slfd", "slfd", {"lr_module": 0.0}),
            "slfd_no_shift": ("slfd_no_shift", "slfd", {})}


def main() -> None:
    parser = study_parser(__doc__, 10, "generate/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="glad and slfd are always run: the summary compares against them")
    parser.add_argument("--archs", nargs="+", default=["convnet"])
    parser.add_argument("--runs", type=int, default=None, help="evaluation runs per set")
    args = parser.parse_args()
    ds = Dataset.load(args.dataset, args.results, "latent_distill", autoencoder=True)
    # the evaluate rule's settings, with --archs as GLaD/SLFD's cross-architecture set
    cross = {"archs": args.archs, "methods": ["glad", "slfd"]}
    evaluate = evaluate_settings({**ds.section("evaluate"), "cross_arch": cross}, "glad")
    if args.runs:
        evaluate["runs"] = args.runs
    extra = evaluate.get("extra_archs", [])
    out = Path(args.out or ROOT / f"results/bench/latent_distill_{ds.name}")
    out.mkdir(parents=True, exist_ok=True)
    variants = {v: VARIANTS[v] for v in VARIANTS if v in {"glad", "slfd", *args.variants}}
    summary: dict[str, dict[str, dict]] = {v: {} for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for variant, (method, settings, overrides) in variants.items():
                summary[variant][str(seed)] = run_set(
                    ds, f"{variant}_seed{seed}", method, args.ipc,
                    ds.method(settings, args.ipc, **overrides), seed, evaluate, out, tmp)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    figures, means = [], {}
    for variant, per_seed in summary.items():
        acc = np.array([s["acc"]["convnet"] for s in per_seed.values()]) * 100
        means[variant] = {"convnet": acc.mean()}
        figures += [f"{variant}_acc: {acc.mean():.1f}", f"{variant}_seed_std: {acc.std():.1f}",
                    f"{variant}_run_std: "
                    f"{np.mean([s['std']['convnet'] for s in per_seed.values()]) * 100:.1f}"]
        if extra:
            cross = np.array([s["cross_arch"] for s in per_seed.values()]) * 100
            means[variant]["cross_arch"] = cross.mean()
            figures.append(f"{variant}_cross_arch: {cross.mean():.1f}")
    for key in means["glad"]:
        suffix = "" if key == "convnet" else f"_{key}"
        figures.append(f"slfd_minus_glad{suffix}: "
                       f"{means['slfd'][key] - means['glad'][key]:.1f}")
    save_figures(figures, out.parent / f"{out.name}.txt")  # the README block bench:<folder>


if __name__ == "__main__":
    main()
