"""Method studies: fixed sets of variants of catalogued methods that answer one question each
(why does PTM fall below random real patches here? is SLFD's module worth its cost?).

Each variant is a method distilled with the dataset's settings plus the variant's overrides, at
the study's ipc and over its seeds, then evaluated on the validation split as a tuning candidate
is: a study compares settings, so it never reads the test split. Rules ``study_set`` and
``study`` (workflow/rules/studies.smk) build them and track them for staleness; the docs quote
the figure file ``results/<dataset>/studies/<study>.txt`` (one ``name: value`` line per figure).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from histodistill.io import read_json, save_figures, write_json


@dataclass(frozen=True)
class Variant:
    """One set of a study: ``method`` (a catalogued distillation method) with ``overrides`` on
    top of the dataset's ``distill.methods.<method>`` settings."""

    method: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Study:
    """A question, the ipc it is asked at, its variants, the variant the others' gains are
    measured against, how many distillation seeds (``distill.seed``, +1, ...) each takes, and
    whether each set is also evaluated under the other stain protocol than its method's
    (``both_protocols``: the test-time normalisation is then one more ablated component, at no
    further distillation)."""

    question: str
    ipc: int
    variants: dict[str, Variant]
    reference: str = "random"
    seeds: int = 1
    both_protocols: bool = False


# MTT's settings in PTM's terms (the pre-tiled demo's ipc 10: 10 student steps per 2 expert
# epochs): no overlap term, no resets, the end point matched alone
_MTT_LIKE = {"syn_steps": 5, "beta_overlap": 0.0, "retrain": 0, "match_points": "end"}

STUDIES: dict[str, Study] = {
    "trajectory_lr": Study(
        "Trajectory matching's image learning rate: MTT's code default 1000 against our 100, "
        "accuracy and saturated pixels of mtt and ptm against random real patches",
        ipc=2,
        variants={**{f"{m}_lr{lr}": Variant(m, {"lr_img": lr})
                     for m in ("mtt", "ptm") for lr in (1000, 100)},
                  "random": Variant("random")}),
    "ptm_ablation": Study(
        "PTM's parts one at a time: which of them makes it fall below random real patches?",
        ipc=10,
        variants={
            "ptm": Variant("ptm"),
            "syn_steps10": Variant("ptm", {"syn_steps": 10}),
            "lr_img10": Variant("ptm", {"lr_img": 10}),
            "retrain0": Variant("ptm", {"retrain": 0}),
            "overlap0": Variant("ptm", {"beta_overlap": 0.0}),
            # the student starts two expert epochs before the end point, not at theta_0:
            # not PTM, the test of its from-theta_0 matching
            "window2": Variant("ptm", {"start_window": 2}),
            "window2_mtt": Variant("ptm", {"start_window": 2, **_MTT_LIKE}),
            "window2_steps5": Variant("ptm", {"start_window": 2, "syn_steps": 5}),
            "ptm_mtt": Variant("ptm", _MTT_LIKE),
            "ptm_mtt_all": Variant("ptm", {**_MTT_LIKE, "match_points": "all"}),
            "ptm_mtt_overlap": Variant("ptm", {**_MTT_LIKE, "beta_overlap": 0.01}),
            "ptm_mtt_retrain": Variant("ptm", {**_MTT_LIKE, "retrain": 2}),
            "mtt": Variant("mtt"),
            "random": Variant("random"),
        }),
    "latent_distill": Study(
        "GLaD against SLFD over distillation seeds: is SLFD's stochastic module worth its "
        "cost, and is it what it learns (slfd_fixed: the module frozen at its initialisation) "
        "or the shift of the synthetic logits (slfd_no_shift: covariance only)?",
        ipc=10,
        variants={"glad": Variant("glad"), "slfd": Variant("slfd"),
                  "slfd_fixed": Variant("slfd", {"lr_module": 0.0}),
                  "slfd_no_shift": Variant("slfd", {"learn_shift": False})},
        reference="glad", seeds=3),
    "histodd_ablation": Study(
        "Histo-DD's parts one at a time on the validation split: which of them costs it its "
        "paper's lead over real patches (the test-time stain normalisation, the stain part or "
        "the whole of its siamese augmentation, the model augmentation of its pool)?",
        ipc=10,
        variants={"histodd": Variant("histodd"),
                  "augment_none": Variant("histodd", {"augment": {"preset": "none"}}),
                  "augment_stain": Variant("histodd", {"augment": {"preset": "stain"}}),
                  "no_model_aug": Variant("histodd", {"alpha": 0.0}),
                  "random": Variant("random")},
        both_protocols=True),
}


def get(name: str) -> Study:
    """The study called ``name``, or an error listing the studies."""
    if name not in STUDIES:
        raise ValueError(f"[study] unknown study {name!r}; studies: {sorted(STUDIES)}")
    return STUDIES[name]


def set_stem(study: str, variant: str, seed: int) -> str:
    """The file stem of one set of a study, under ``results/<dataset>/studies/<study>/``: it
    names the method and ipc so that a set's files say what they hold."""
    s = get(study)
    return f"{s.variants[variant].method}_ipc{s.ipc}_{variant}_s{seed}"


def summarise(study: str, results: dict[str, list[dict[str, Any]]]
              ) -> tuple[dict[str, Any], list[str]]:
    """The summary of a study from its sets' result files (``results``: variant -> one result
    per seed) and its ``name: value`` figures in percent: per variant and evaluated
    architecture the validation accuracy (mean over seeds), the std over training runs, over
    seeds when there are several, the gain over the reference variant (also per stain protocol
    when the sets were evaluated under both, see :func:`_views`); the saturated pixels,
    and the cross-architecture mean where it was evaluated."""
    ref = get(study).reference
    summary: dict[str, Any] = {}
    for variant, runs in results.items():
        row: dict[str, Any] = {"seeds": [r["config"]["seed"] for r in runs]}
        for key in _views(runs[0]):
            cells = [_views(r)[key]["acc"] for r in runs]
            accs = np.array([c["mean"] for c in cells]) * 100
            row[key] = {"acc": float(accs.mean()), "seed_std": float(accs.std()),
                        "run_std": float(np.mean([c["std"] for c in cells]) * 100)}
        row["saturated_pct"] = float(np.mean([r["saturated_fraction"] for r in runs]) * 100)
        row["distill_s"] = float(np.mean([r["distill"]["seconds"] for r in runs]))
        if all("cross_arch" in r for r in runs):
            row["cross_arch"] = float(np.mean([r["cross_arch"]["acc"]["mean"] for r in runs]) * 100)
        summary[variant] = row
    figures = []
    for variant, row in summary.items():
        for arch, cell in row.items():
            if not isinstance(cell, dict):
                continue
            figures += [f"{variant}_{arch}_acc: {cell['acc']:.1f}",
                        f"{variant}_{arch}_run_std: {cell['run_std']:.1f}"]
            if len(row["seeds"]) > 1:
                figures.append(f"{variant}_{arch}_seed_std: {cell['seed_std']:.1f}")
            if variant != ref and arch in summary[ref]:
                figures.append(f"{variant}_{arch}_gain_over_{ref}: "
                               f"{cell['acc'] - summary[ref][arch]['acc']:.1f}")
        figures.append(f"{variant}_saturated_pct: {row['saturated_pct']:.2f}")
        if "cross_arch" in row:
            figures.append(f"{variant}_cross_arch: {row['cross_arch']:.1f}")
            if variant != ref and "cross_arch" in summary[ref]:
                figures.append(f"{variant}_cross_arch_gain_over_{ref}: "
                               f"{row['cross_arch'] - summary[ref]['cross_arch']:.1f}")
    return summary, figures


def _views(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A set's figures per evaluated architecture under its method's stain protocol (keyed by
    the architecture) and, when the set was evaluated under both, per protocol (keyed
    ``<arch>_stain_on`` / ``<arch>_stain_off``, so variants of methods with different own
    protocols compare under the same one)."""
    views = dict(result["patch"])
    if "other_protocol" in result:
        for r in (result, result["other_protocol"]):
            state = "on" if r["stain_norm"] else "off"
            views.update({f"{arch}_stain_{state}": cell for arch, cell in r["patch"].items()})
    return views


def write_study(study: str, sets: list[str | os.PathLike], out_json: str | os.PathLike,
                out_figures: str | os.PathLike) -> None:
    """Read a study's set results (``sets``: in the order of :func:`set_paths`), write its
    summary (JSON, with the question and the set files) and its figure file."""
    s = get(study)
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in s.variants}
    for variant, path in zip(set_order(study), sets, strict=True):
        results[variant].append(read_json(path, "study"))
    summary, figures = summarise(study, results)
    record = {"study": study, "question": s.question, "ipc": s.ipc, "reference": s.reference,
              "split": "val", "both_protocols": s.both_protocols,
              "variants": {v: {"method": x.method, "overrides": x.overrides}
                           for v, x in s.variants.items()},
              "sets": [str(p) for p in sets], "summary": summary}
    write_json(out_json, record)
    save_figures(figures, out_figures)


def set_order(study: str) -> list[str]:
    """The variant of each set of ``study``, seed by seed (the order of :func:`set_paths`)."""
    return [variant for variant, _ in _sets(study)]


def _sets(study: str) -> list[tuple[str, int]]:
    """(variant, seed offset) of every set of ``study``, variant by variant."""
    s = get(study)
    return [(v, k) for v in s.variants for k in range(s.seeds)]


def set_paths(dataset: str, study: str, seed: int) -> list[str]:
    """The result files of every set of ``study`` on ``dataset``, variant by variant and seed
    by seed from ``seed`` (the dataset's ``distill.seed``)."""
    return [f"results/{dataset}/studies/{study}/{set_stem(study, v, seed + k)}.json"
            for v, k in _sets(study)]
