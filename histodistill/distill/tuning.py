"""Choosing a method's settings on the validation split, and summarising distillation seeds.

A method's declared grid (``tuning.candidates.<method>``: a list of setting overrides) is
distilled once per candidate at the method's configured budget, and each candidate set is
trained on and tested on the **validation** split (:func:`histodistill.evaluate.evaluate_candidate`,
rule tune_candidate); the candidate with
the best mean validation accuracy is the method's setting (ties: the first listed; a candidate
with more saturated pixels than ``tuning.max_saturated`` only when every candidate has). The test
split never picks a setting: nothing here or in the candidates' evaluation reads it. The distill rule then takes the
chosen candidate's set (same settings, same seed, so the same set) and the result records the
choice.

Seeds: a result's figure is one distillation seed's mean over training runs; a paper's claim is
tested over several distillation seeds (:func:`seed_summary`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from histodistill.config import with_candidate
from histodistill.distill.run import distill
from histodistill.distilled import adopt
from histodistill.metrics import METRICS
from histodistill.io import read_json, write_json

def choose(candidates: list[str | os.PathLike], out: str | os.PathLike,
           max_saturated: float) -> dict[str, Any]:
    """The candidate with the best mean validation accuracy of the first evaluated
    architecture (ties: the first; a diverged candidate never); writes every candidate's
    figures and the choice.

    A set with more than ``max_saturated`` of its pixels at 0 or 255 is not shareable as it
    is (it is clipped to uint8), so such a candidate is chosen only when every candidate is
    above the limit; the choice records whether it is within it."""
    records = [read_json(p, "tune") for p in candidates]
    if any(r["split"] == "test" for r in records):
        raise ValueError("tune: a candidate was evaluated on the test split")
    arch = next(iter(records[0]["patch"]))
    # a candidate whose images stopped being finite is never chosen
    diverged = [r["distill"].get("diverged_at") is not None for r in records]
    if all(diverged):
        raise ValueError(f"tune: every candidate diverged: {[r['overrides'] for r in records]}")
    within = [r["saturated_fraction"] <= max_saturated for r in records]
    eligible = [w and not d for w, d in zip(within, diverged)]
    if not any(eligible):
        eligible = [not d for d in diverged]
    scores = [r["patch"][arch]["acc"]["mean"] if ok else -np.inf
              for r, ok in zip(records, eligible)]
    best = int(np.argmax(scores))  # first maximum
    choice = {"split": records[0]["split"], "arch": arch, "choice": best,
              "overrides": records[best]["overrides"], "max_saturated": max_saturated,
              "within_saturation_limit": within[best],
              "candidates": [{"overrides": r["overrides"], "acc": r["patch"][arch]["acc"],
                              "auc": r["patch"][arch]["auc"],
                              "saturated_fraction": r["saturated_fraction"],
                              "seconds": r["distill"]["seconds"],
                              "diverged_at": r["distill"].get("diverged_at"),
                              "image_updates": r["distill"].get("image_updates")}
                             for r in records]}
    write_json(out, choice)
    return choice


def apply_choice(cfg: dict[str, Any], choice: dict[str, Any] | None, method: str,
                 keep: dict[str, Any] | None = None) -> dict[str, Any]:
    """``cfg`` with the chosen candidate's overrides (none: unchanged), except the keys that
    ``keep`` sets: settings the user gave for this use (per-slide overrides) win."""
    if choice is None:
        return cfg
    overrides = {k: v for k, v in choice["overrides"].items() if k not in (keep or {})}
    return with_candidate(cfg, overrides, method)


def read_choice(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """A tuned method's choice file (rule tune); None when the method is not tuned."""
    return read_json(path, "tune") if path else None


def distill_or_adopt(method: str, ipc: int, cfg: dict[str, Any], seed: int,
                     out: dict[str, str | os.PathLike], *,
                     choice_path: str | os.PathLike | None, candidate_stem: str,
                     tuned_seed: int, **inputs: Any) -> None:
    """Rule distill's set. An untuned method (no ``choice_path``) is distilled with ``cfg``. A
    tuned one runs with its chosen candidate's overrides: at ``tuned_seed`` (the seed its
    candidates were distilled with) the chosen candidate's set ``<candidate_stem><k>.*`` is that
    set and is taken as it is; at other seeds it is distilled. The cost file records the choice.
    ``out`` holds ``zarr``, ``grid`` and ``cost``; ``inputs`` are :func:`distill`'s other
    arguments (store, template, pool, checkpoint, experts, autoencoder, ...)."""
    choice = read_choice(choice_path)
    if choice is not None and seed == tuned_seed:
        stem = f"{candidate_stem}{choice['choice']}"
        adopt({"zarr": f"{stem}.zarr", "grid": f"{stem}.png", "cost": f"{stem}_cost.json"}, out,
              {"tuning": choice})
        return
    distill(method, ipc, apply_choice(cfg, choice, method), seed, out,
            extra_cost={"tuning": choice} if choice else None, **inputs)


def seed_summary(results: list[str | os.PathLike], seeds: list[int],
                 out: str | os.PathLike) -> dict[str, Any]:
    """Per-seed figures of one method's sets distilled with ``seeds`` (each a patch-evaluation
    file: its mean over training runs) and, per metric and architecture, their mean and std over
    seeds (the spread a paper's claim has to clear); cross-architecture and the other stain
    protocol likewise when present."""
    evals = [read_json(p, "seeds") for p in results]

    def over_seeds(pick: Any) -> dict[str, Any]:
        values = [pick(e) for e in evals]
        return {"mean": float(np.mean(values)), "std": float(np.std(values)), "seeds": values}

    def figures(view: Any) -> dict[str, Any]:
        """Per-architecture (and cross-architecture) metrics over seeds of ``view(e)``."""
        first = view(evals[0])
        out = {"patch": {a: {m: over_seeds(lambda e, a=a, m=m: view(e)["patch"][a][m]["mean"])
                             for m in METRICS} for a in first["patch"]}}
        if "cross_arch" in first:
            out["cross_arch"] = {m: over_seeds(lambda e, m=m: view(e)["cross_arch"][m]["mean"])
                                 for m in METRICS}
        return out

    summary: dict[str, Any] = {"method": evals[0]["method"], "ipc": evals[0]["ipc"],
                               "dataset": evals[0]["dataset"], "seeds": seeds,
                               "stain_norm": evals[0]["stain_norm"], **figures(lambda e: e)}
    if "other_protocol" in evals[0]:
        summary["other_protocol"] = {"stain_norm": evals[0]["other_protocol"]["stain_norm"],
                                     **figures(lambda e: e["other_protocol"])}
    summary["saturated_fraction"] = over_seeds(lambda e: e["saturated_fraction"])
    summary["distill"] = {"seconds": over_seeds(lambda e: e["distill"]["seconds"]),
                          "image_updates": over_seeds(lambda e: e["distill"].get("image_updates", 0))}
    write_json(out, summary)
    return summary
