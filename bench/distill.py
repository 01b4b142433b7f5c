"""Distillation cost: Histo-DD and DM loops against the bare network passes they cannot avoid.

Usage: python bench/distill.py [--store results/demo/patches.zarr] [--repeats N] [--smoke]

On the demo store with the demo profile (config.yaml and configs/demo.yaml), in one run,
interleaved, best of N:
  histodd - one outer loop (U inner iterations) as the method runs it: network drawn from the
            pool and perturbed, per class a streamed real and a synthetic batch augmented alike,
            layer-wise L1 gradient match and an image step, then a network pass over n_data
            streamed real patches;
  histodd bare - only the first- and second-order gradient computations of those matches and the
            network updates, on pre-sampled tensors without augmentation;
  dm      - one iteration (fresh network, per class augmented real and synthetic embeddings);
  dm bare - forward of the real batches plus forward and backward of the synthetic batch.
Peak memory is the highest resident-set growth seen while each ran. Ratios near 1.0 mean the
method costs little beyond its unavoidable network passes.

``--smoke``: a check that the bench still runs (the test suite's), in seconds: a tiny store of
real H&E crops and its stain template built here (nothing from `make demo`), ConvNets of
width 8, ipc 2, one inner iteration on batches of 8, one repeat, one thread; figures go to
results/bench/smoke/distill.txt.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

from histodistill import config, models
from histodistill.data.real import RealData
from histodistill.distill import Context, build
from histodistill.distill.matching import match_loss, matched_params
from histodistill.io import save_figures
from histodistill.stain import StainTemplate, build_template
from histodistill.data.store import PatchStore

ROOT = Path(__file__).resolve().parent.parent
# --smoke: the sizes that keep the loops' code paths at a few seconds
SMOKE = {"ipc": 2, "pool": {"net_kwargs": {"width": 8}},
         "histodd": {"inner_loop": 1, "n_data": 8, "batch_real": 8, "batch_net": 8},
         "dm": {"batch_real": 8, "net_kwargs": {"width": 8}}}


class PeakRSS:
    """Highest RSS growth (MB) of this process while the context is open (5 ms sampling)."""

    def __enter__(self) -> "PeakRSS":
        self.proc, self.stop = psutil.Process(), threading.Event()
        self.base = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.mb = (self.peak - self.base) / 2**20


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    best, mem = float("inf"), 0.0
    for _ in range(repeats):
        with PeakRSS() as peak:
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        mem = max(mem, peak.mb)
    return best, mem


def smoke_store(folder: Path) -> Path:
    """A tiny two-class store of real H&E crops with its stain template beside it, laid out as
    the pipeline's (``<folder>/patches.zarr``, ``<folder>/stain/template.json``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from privacy import make_store  # bench/privacy.py, beside this script

    store = make_store(folder / "patches.zarr", 16, held_out=4)
    build_template(store, folder / "stain/template.json", folder / "stain/template.png",
                   **config.defaults("stain"))
    return store


def bench(store: str, repeats: int, out: Path, smoke: dict | None = None) -> None:
    """Time the loops on ``store`` and save the figures to ``out`` (``smoke``: the sizes that
    override the demo profile's)."""
    smoke = smoke or {}
    torch.set_num_threads(1 if smoke else 2)
    cfg = config.load(config.CONFIG, *config.overlays("demo"))
    dist_cfg = config.section(cfg, "demo", "distill")
    real = RealData(PatchStore(store), "train", dist_cfg["cache_mb"], 0, torch.device("cpu"))
    template = StainTemplate.load(Path(store).parent / "stain/template.json")
    n_classes, size = real.num_classes, real.im_size
    pool_cfg = {**dist_cfg["pool"], **smoke.get("pool", {})}
    states = []
    for k in range(2):
        torch.manual_seed(k)
        states.append(models.build(pool_cfg["net"], n_classes, size, **pool_cfg["net_kwargs"]).state_dict())
    pool = {"net": pool_cfg["net"], "net_kwargs": pool_cfg["net_kwargs"], "states": states}
    ctx = Context(real, 0, template, None, pool, progress=False)
    ipc = smoke.get("ipc", 10)

    h_cfg = {**config.method_config(cfg, "demo", "histodd", ipc), **smoke.get("histodd", {})}
    histodd = build("histodd", h_cfg, ipc, ctx)
    histodd.init_state()
    d_cfg = {**config.method_config(cfg, "demo", "dm", ipc), **smoke.get("dm", {})}
    dm = build("dm", d_cfg, ipc, ctx)
    dm.init_state()

    real_h = [real.batch(c, h_cfg["batch_real"]) for c in range(n_classes)]
    real_d = [real.batch(c, d_cfg["batch_real"]) for c in range(n_classes)]
    net_x, net_y = real.mixed(h_cfg["batch_net"])
    net_steps = -(-int(h_cfg["n_data"]) // int(h_cfg["batch_net"]))
    syn = histodd.to_net(histodd.images.detach()).requires_grad_(True)

    def histodd_bare() -> None:
        net = models.build(pool["net"], n_classes, size, **pool["net_kwargs"])
        net.load_state_dict(states[0])
        params = matched_params(net, "l1", False)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        for _ in range(int(h_cfg["inner_loop"])):
            for c in range(n_classes):
                match_loss(net, params, real_h[c], torch.full((len(real_h[c]),), c),
                           syn[c * ipc:(c + 1) * ipc], torch.full((ipc,), c), "l1").backward()
            for _ in range(net_steps):
                opt.zero_grad()
                F.cross_entropy(net(net_x), net_y).backward()
                opt.step()

    def dm_bare() -> None:
        net = models.build(d_cfg["net"], n_classes, size, **d_cfg.get("net_kwargs", {}))
        for p in net.parameters():
            p.requires_grad_(False)
        loss = 0.0
        for c in range(n_classes):
            with torch.no_grad():
                mean_real = net.embed(real_d[c]).mean(0)
            loss = loss + ((mean_real - net.embed(syn[c * ipc:(c + 1) * ipc]).mean(0)) ** 2).sum()
        loss.backward()

    it = iter(range(10**6))
    results = {}
    for _ in range(repeats):  # interleave so machine load drifts hit every variant
        for name, fn in {"histodd": lambda: histodd.step(next(it)), "histodd_bare": histodd_bare,
                         "dm": lambda: dm.step(next(it)), "dm_bare": dm_bare}.items():
            t, m = timed(fn, 1)
            best, mem = results.get(name, (float("inf"), 0.0))
            results[name] = (min(best, t), max(mem, m))
    print(f"demo store {store}: {sum(real.counts)} training patches of {size} px, {n_classes} classes, "
          f"ipc {ipc}; histodd U={h_cfg['inner_loop']}, batch_real={h_cfg['batch_real']}, "
          f"augment={h_cfg['augment']}; dm batch_real={d_cfg['batch_real']}; best of {repeats}")
    figures = [
        f"histodd_outer_loop_s: {results['histodd'][0]:.3f}",
        f"histodd_bare_s: {results['histodd_bare'][0]:.3f}",
        f"histodd_peak_mem_mb: {results['histodd'][1]:.0f}",
        f"dm_iteration_s: {results['dm'][0]:.4f}",
        f"dm_bare_s: {results['dm_bare'][0]:.4f}",
        f"dm_peak_mem_mb: {results['dm'][1]:.0f}",
        f"dm_overhead: {results['dm'][0] / results['dm_bare'][0]:.2f}",
        f"histodd_overhead: {results['histodd'][0] / results['histodd_bare'][0]:.2f}",
    ]
    save_figures(figures, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=str(ROOT / "results/demo/patches.zarr"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: check the bench runs")
    args = parser.parse_args()
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            bench(str(smoke_store(Path(tmp))), 1, ROOT / "results/bench/smoke/distill.txt", SMOKE)
    else:
        bench(args.store, args.repeats, ROOT / "results/bench/distill.txt")


if __name__ == "__main__":
    main()
