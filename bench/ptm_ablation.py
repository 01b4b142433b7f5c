"""PTM's parts one at a time: which of them makes it fall below random real patches at ipc 10?

Usage: python bench/ptm_ablation.py [--dataset demo_patches] [--ipc 10] [--variants ...]
                                    [--out DIR]

Needs the dataset's store, template, full-data result and expert buffer, and the pipeline's mtt
and random results at that ipc for the comparison (e.g. `snakemake --cores 2
results/demo_patches/{mtt,random}_ipc10.json --configfile configs/demo_patches.yaml` builds them);
stops with a message when one is missing. With the dataset's ptm settings (config.yaml and its
overlay, configs/<dataset>.yaml), each variant changes one thing:
  ptm             - as configured (the reference of every other variant);
  syn_steps10     - 10 student steps per expert epoch;
  lr_img10        - a tenth of the demo's image learning rate (does the saturation matter?);
  retrain0        - without the retraining resets of S^c;
  overlap0        - without the overlap term;
  window2         - the student starts at theta_{t-2} instead of theta_0 (MTT's span of two
                    expert epochs, end points still progressive): not PTM, the test of its
                    from-theta_0 matching;
  window2_mtt     - window2 with MTT's settings (5 student steps per expert epoch, no
                    overlap term, no resets, matching at the end point): MTT whose start epochs
                    follow PTM's schedule instead of being drawn;
  window2_steps5  - window2 with MTT's 5 student steps per expert epoch, PTM's terms kept;
  ptm_mtt         - PTM (from theta_0) with MTT's settings: its schedule without its terms;
  ptm_mtt_all, ptm_mtt_overlap, ptm_mtt_retrain - ptm_mtt with one of PTM's parts back (matching
                    at every epoch boundary, the overlap term, the resets) as configured.
Each set is evaluated with the dataset's evaluation settings on the validation split. A set already in --out with the
same settings is read back (the study resumes). Prints one `name: value` line per figure: per
variant the ConvNet accuracy, its std and the saturated pixels, its gain over random real
patches. Grids and full results go to --out (default results/bench/ptm_ablation_<dataset>), the
figures to the file of that name with .txt (the README's block bench:ptm_ablation_<dataset>).
About 4 minutes per variant on 2 idle CPU cores at the pre-tiled demo's profile (syn_steps10:
16 minutes).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import (ROOT, Dataset, convnet_row, gain_figures, result_summary,  # noqa: E402
                   run_set, study_parser)

from histodistill.distill.base import register  # noqa: E402
from histodistill.distill.ptm import PTM  # noqa: E402
from histodistill.io import save_figures  # noqa: E402


@register("ptm_window")
class WindowPTM(PTM):
    """PTM whose student starts ``window`` expert epochs before the end point (not from
    theta_0): the progressive schedule without PTM's from-the-start matching."""

    def start_epoch(self, t: int) -> int:
        return max(0, t - int(self.cfg["window"]))


# MTT's demo settings at ipc 10 in PTM's terms: 10 student steps per 2 expert epochs, no
# overlap term, no resets, the end point matched alone
MTT_LIKE = {"syn_steps": 5, "beta_overlap": 0.0, "retrain": 0, "match_points": "end"}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "ptm": ("ptm", {}),
    "syn_steps10": ("ptm", {"syn_steps": 10}),
    "lr_img10": ("ptm", {"lr_img": 10}),
    "retrain0": ("ptm", {"retrain": 0}),
    "overlap0": ("ptm", {"beta_overlap": 0.0}),
    "window2": ("ptm_window", {"window": 2}),
    "window2_mtt": ("ptm_window", {"window": 2, **MTT_LIKE}),
    "window2_steps5": ("ptm_window", {"window": 2, "syn_steps": 5}),
    "ptm_mtt": ("ptm", MTT_LIKE),
    "ptm_mtt_all": ("ptm", {**MTT_LIKE, "match_points": "all"}),
    "ptm_mtt_overlap": ("ptm", {**MTT_LIKE, "beta_overlap": 0.01}),
    "ptm_mtt_retrain": ("ptm", {**MTT_LIKE, "retrain": 2}),
}


def main() -> None:
    parser = study_parser(__doc__, 10, "experts/")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    ds = Dataset.load(args.dataset, args.results, "ptm_ablation", experts=True)
    base = Path(args.results) / ds.name
    reference = {m: base / f"{m}_ipc{args.ipc}.json" for m in ("mtt", "random")}
    missing = [str(p) for p in reference.values() if not p.exists()]
    if missing:
        sys.exit(f"ptm_ablation: {', '.join(missing)} missing; build them first")
    seed = int(ds.section("distill")["seed"])
    out = Path(args.out or ROOT / f"results/bench/ptm_ablation_{ds.name}")
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants:
            method, overrides = VARIANTS[name]
            m_cfg = ds.method("ptm", args.ipc, **overrides)
            s = run_set(ds, f"ptm_ipc{args.ipc}_{name}", method, args.ipc, m_cfg, seed,
                        ds.section("evaluate"), out, tmp)
            summary[name] = convnet_row(s)
            print(name, summary[name], flush=True)
    for m, path in reference.items():
        summary[m] = {**convnet_row(result_summary(json.loads(path.read_text()))),
                      "source": str(path)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    figures = gain_figures(summary)
    save_figures(figures, out.parent / f"{out.name}.txt")  # the README block bench:<folder>


if __name__ == "__main__":
    main()
