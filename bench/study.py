"""Shared by the method studies in bench/ (trajectory_lr.py, latent_distill.py): distil a set with
the library's ``distill``, evaluate it with the dataset's evaluation settings on the validation
split (a study compares settings: it never reads the test split), keep the figures.

Not a benchmark itself. The studies run on a dataset the pipeline has built, so ``Dataset``
checks the inputs the methods need and stops with one message naming what is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histodistill import config
from histodistill.distill.run import distill
from histodistill.evaluate import evaluate_candidate
from histodistill.params import without_operational

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Dataset:
    """One built dataset: its store, stain template, full-data result and optional inputs."""

    name: str
    cfg: dict[str, Any]
    store: Path
    template: Path
    full: dict[str, Path]
    experts: Path | None = None
    autoencoder: Path | None = None

    @classmethod
    def load(cls, name: str, results: str | Path, study: str, experts: bool = False,
             autoencoder: bool = False) -> Dataset:
        """The dataset's files under ``results``; exits with a message when one is missing."""
        cfg = config.load(config.CONFIG, *config.overlays(name))  # its profile, if an overlay
        base = Path(results) / name
        ds = cls(name, cfg, base / "patches.zarr", base / "stain/template.json",
                 {"convnet": base / "full/convnet.json"})
        if experts:
            ds.experts = base / "experts" / f"{config.section(cfg, name, 'trajectories')['net']}.h5"
        if autoencoder:
            ds.autoencoder = base / "generate/autoencoder.pt"
        needed = [ds.store, ds.template, *ds.full.values(), ds.experts, ds.autoencoder]
        missing = [str(p) for p in needed if p is not None and not p.exists()]
        if missing:
            sys.exit(f"{study}: {', '.join(missing)} missing; build the dataset's targets first "
                     "(see the script's docstring)")
        return ds

    def section(self, key: str) -> dict[str, Any]:
        """The dataset's settings of one stage (the global section merged with its profile)."""
        return config.section(self.cfg, self.name, key)

    def method(self, method: str, ipc: int, **overrides: Any) -> dict[str, Any]:
        """A method's settings for this dataset and ipc, with ``overrides`` on top."""
        return {**config.method_config(self.cfg, self.name, method, ipc), **overrides}


def study_parser(doc: str, ipc: int, needs: str) -> argparse.ArgumentParser:
    """The arguments every study takes: --dataset, --results (the folder holding the dataset's
    store, template, full-data result and ``needs``), --ipc and --out; a study adds its own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--dataset", default="demo_patches")
    parser.add_argument("--results", default=str(ROOT / "results"),
                        help=f"folder holding <dataset>/patches.zarr, stain/, full/ and {needs}")
    parser.add_argument("--ipc", type=int, default=ipc)
    parser.add_argument("--out", default=None)
    return parser


def _effective(evaluate: dict[str, Any]) -> dict[str, Any]:
    """The evaluation settings a result depends on: without the full-data training (read from
    the cached files), the operational knobs and ``cross_arch`` (the pipeline turns it into
    ``extra_archs``; none is no extra architecture)."""
    kept = {k: v for k, v in without_operational(evaluate).items() if k not in ("full", "cross_arch")}
    if not kept.get("extra_archs"):
        kept.pop("extra_archs", None)
    return json.loads(json.dumps(kept))


def _reusable(result: Path, m_cfg: dict[str, Any], seed: int, evaluate: dict[str, Any]
              ) -> dict[str, Any] | None:
    """A set's earlier result when it was distilled and evaluated with the same settings (as
    its result file recorded them), so an interrupted study resumes; else None."""
    if not result.exists() or not result.with_suffix(".png").exists():
        return None
    r = json.loads(result.read_text())
    if r.get("split") != "val":  # an earlier study's test-split figure is never reused
        return None
    recorded = r.get("config", {})
    same = (recorded.get("distill") == json.loads(json.dumps(m_cfg))
            and recorded.get("seed") == seed
            and _effective(recorded.get("evaluate", {})) == _effective(evaluate))
    return r if same else None


def run_set(ds: Dataset, name: str, method: str, ipc: int, m_cfg: dict[str, Any], seed: int,
            evaluate: dict[str, Any], out: Path, tmp: str | Path) -> dict[str, Any]:
    """Distil one set (grid to ``out/<name>.png``), evaluate it on the validation split
    (``out/<name>.json``) and return its summary: accuracy mean and std per architecture,
    saturation and distillation cost. A set already in ``out`` with the same settings is read
    back, not rebuilt."""
    r = _reusable(out / f"{name}.json", m_cfg, seed, evaluate)
    if r is None:
        zarr_path, cost = Path(tmp) / f"{name}.zarr", Path(tmp) / f"{name}_cost.json"
        distill(method, ipc, m_cfg, seed, {"zarr": zarr_path, "grid": out / f"{name}.png", "cost": cost},
                store_path=ds.store, template_path=ds.template,
                cache_mb=ds.section("distill")["cache_mb"], progress=False, experts=ds.experts,
                autoencoder=ds.autoencoder)
        r = evaluate_candidate(zarr_path, cost, ds.store, ds.template, evaluate, {},
                               out / f"{name}.json")
    return result_summary(r)


def result_summary(r: dict[str, Any]) -> dict[str, Any]:
    """The figures of one result file ``r``: accuracy mean and std per architecture, saturation
    and distillation cost (and the cross-architecture mean when evaluated)."""
    summary = {"acc": {a: v["acc"]["mean"] for a, v in r["patch"].items()},
               "std": {a: v["acc"]["std"] for a, v in r["patch"].items()},
               "saturated": r["saturated_fraction"], "distill_s": r["distill"]["seconds"],
               "device": r["distill"]["device"]}
    if "cross_arch" in r:
        summary["cross_arch"] = r["cross_arch"]["acc"]["mean"]
    return summary


def convnet_row(summary: dict[str, Any]) -> dict[str, Any]:
    """A set's ConvNet accuracy and std, saturation and cost: one row of a study's summary."""
    return {"acc": summary["acc"]["convnet"], "std": summary["std"]["convnet"],
            **{k: summary[k] for k in ("saturated", "distill_s", "device")}}


def gain_figures(summary: dict[str, dict[str, Any]], reference: str = "random") -> list[str]:
    """`name: value` lines of a study's sets (``summary``: name -> acc, std, saturated as
    fractions): accuracy and its std per set, then the saturated pixels and the gain over
    ``reference`` of every other set, all in percent."""
    base = summary[reference]["acc"]
    others = [(n, s) for n, s in summary.items() if n != reference]
    return ([f"{n}_acc: {s['acc'] * 100:.1f}" for n, s in summary.items()]
            + [f"{n}_std: {s['std'] * 100:.1f}" for n, s in summary.items()]
            + [f"{n}_saturated_pct: {s['saturated'] * 100:.2f}" for n, s in others]
            + [f"{n}_gain_over_{reference}: {(s['acc'] - base) * 100:.1f}" for n, s in others])
