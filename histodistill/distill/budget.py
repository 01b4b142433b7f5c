"""Equal-budget comparisons: each method's cost per iteration measured on this machine, and the
iteration counts that fill one stated budget of distillation seconds.

A comparison of methods is fair only at an equal budget. The unit here is distillation
wall-clock on one machine (the loop's seconds, as every cost file records them beside the image
updates): a few iterations of each method, spread over its run, are timed at its dataset's
settings on an otherwise idle machine, its seconds per iteration measured, and ``budget / seconds
per iteration`` iterations written out as the YAML
block to paste into the dataset's profile (its overlay, configs/<dataset>.yaml, read with
config.yaml unless --config names the files), so that a rerun is reproducible from the counts.
The measurement is recorded (JSON) with the machine it was taken on.

Usage: python -m histodistill.distill.budget --dataset pcam --seconds 900 --ipc 2 10 \\
           --methods histodd dm --out docs/results/pcam/budget.json
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from histodistill import config as hdconfig
from histodistill.distill.base import build
from histodistill.distill.run import context
from histodistill.io import read_json, write_json

# the iteration count of each method family, by the setting that holds it
COUNT_KEY = {"histodd": "outer_loop"}


def method_inputs(cfg: dict[str, Any], dataset: str, method: str) -> dict[str, str]:
    """The rule inputs a method needs beyond store and template, at their pipeline paths (a
    trajectory method's own expert buffer when it has one, else the dataset's)."""
    root = f"results/{dataset}"
    if method in ("mtt", "ptm"):
        trajectories = hdconfig.section(cfg, dataset, "trajectories")
        own = hdconfig.section(cfg, dataset, "distill")["methods"].get(method, {})
        if "trajectories" in own:
            net = hdconfig.merge(trajectories, own["trajectories"])["net"]
            return {"experts": f"{root}/experts/{net}_{method}.h5"}
        return {"experts": f"{root}/experts/{trajectories['net']}.h5"}
    return {"histodd": {"pool_path": f"{root}/pool.pt"},
            "glad": {"autoencoder": f"{root}/generate/autoencoder.pt"},
            "slfd": {"autoencoder": f"{root}/generate/autoencoder.pt"}}.get(method, {})


def seconds_per_iteration(method: str, cfg: dict[str, Any], ipc: int, ctx_args: dict[str, Any],
                          probe: int) -> float:
    """Mean seconds of ``probe`` iterations of ``method`` spread evenly over its run (a method
    whose iterations grow dearer along its schedule, as PTM's with its end point, is measured
    across it, not at its cheap start)."""
    ctx = context(progress=False, **ctx_args)
    distiller = build(method, {**cfg, "checkpoint_every": 10**9}, ipc, ctx)
    distiller.init_state()
    total = 0.0
    points = sorted({int(k * distiller.iterations / probe) for k in range(probe)})
    for it in points:
        start = time.perf_counter()
        distiller.step(it)
        total += time.perf_counter() - start
    return total / len(points)


def calibrate(cfg: dict[str, Any], dataset: str, methods: list[str], ipcs: list[int],
              seconds: float, probe: int = 3) -> dict[str, Any]:
    """Seconds per iteration and the counts filling ``seconds`` for each method and ipc."""
    root = f"results/{dataset}"
    distill_cfg = hdconfig.section(cfg, dataset, "distill")
    out: dict[str, Any] = {"dataset": dataset, "budget_s": seconds, "probe_iterations": probe,
                           "machine": {"cpu": platform.processor() or platform.machine(),
                                       "threads": torch.get_num_threads(),
                                       "cuda": torch.cuda.is_available()},
                           "methods": {}}
    for method in methods:
        per_ipc: dict[int, dict[str, float | int]] = {}
        for ipc in ipcs:
            m_cfg = hdconfig.method_config(cfg, dataset, method, ipc)
            args = {"store_path": f"{root}/patches.zarr",
                    "template_path": f"{root}/stain/template.json", "pool_path": None,
                    "seed": distill_cfg["seed"], "cache_mb": distill_cfg["cache_mb"],
                    "max_per_class": distill_cfg["max_real_per_class"],
                    **method_inputs(cfg, dataset, method)}
            missing = [p for p in args.values() if isinstance(p, str) and not Path(p).exists()]
            if missing:
                raise FileNotFoundError(f"budget: {method} needs {missing}; build them first")
            cost = seconds_per_iteration(method, m_cfg, ipc, args, probe)
            per_ipc[ipc] = {"seconds_per_iteration": cost,
                            "iterations": max(1, math.floor(seconds / cost))}
        out["methods"][method] = {"key": COUNT_KEY.get(method, "iterations"), "ipc": per_ipc}
    return out


def profile_block(calibration: dict[str, Any]) -> str:
    """The YAML of the counts for ``datasets.<dataset>.distill.methods``."""
    block = {m: {c["key"]: {ipc: v["iterations"] for ipc, v in c["ipc"].items()}}
             for m, c in calibration["methods"].items()}
    return yaml.safe_dump(block, sort_keys=False, default_flow_style=None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--seconds", type=float, required=True, help="the budget per run")
    parser.add_argument("--ipc", type=int, nargs="+", required=True)
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--probe", type=int, default=3, help="iterations measured per method")
    parser.add_argument("--config", nargs="+", default=None,
                        help="config files merged in order (default: config.yaml and the "
                             "dataset's overlay configs/<dataset>.yaml, when it has one)")
    parser.add_argument("--out", required=True, help="JSON of the measurement")
    args = parser.parse_args(argv)
    files = args.config or [hdconfig.CONFIG, *hdconfig.overlays(args.dataset)]
    cfg = hdconfig.load(*files)
    torch.set_num_threads(int(os.environ.get("BUDGET_THREADS", torch.get_num_threads())))
    calibration = calibrate(cfg, args.dataset, args.methods, args.ipc, args.seconds, args.probe)
    write_json(args.out, merged(args.out, calibration))
    print(profile_block(calibration))


def merged(path: str | os.PathLike, calibration: dict[str, Any]) -> dict[str, Any]:
    """``calibration`` joined to the measurements already in ``path`` for the same dataset and
    budget (one file holds every method and ipc of a comparison); another budget replaces it."""
    if not Path(path).exists():
        return calibration
    old = read_json(path, "budget")
    if (old.get("dataset"), old.get("budget_s")) != (calibration["dataset"],
                                                     calibration["budget_s"]):
        return calibration
    methods = old["methods"]
    for method, new in calibration["methods"].items():
        entry = methods.setdefault(method, {"key": new["key"], "ipc": {}})
        entry["ipc"].update({str(ipc): v for ipc, v in new["ipc"].items()})
    return {**calibration, "methods": methods}


if __name__ == "__main__":
    main()
