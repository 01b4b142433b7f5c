"""Memory at cohort scale: peak RSS must not grow with the patch store.

Usage: python bench/memory.py [--n 4000] [--cache-mb 24] [--smoke]

Builds two stores of 64 px patches (N and 4N rows, three classes, train and test interleaved)
and runs each stage in a fresh process on each, reading the child's peak resident set size:
  distill_histodd - pool pre-training (streamed epochs) and Histo-DD outer loops;
  distill_dm      - DM iterations;
  evaluate        - full-data training (streamed epochs) and evaluation of a distilled set on
                    the streamed test split.
``peak_rss_ratio_*`` is 4N over N (1.0: flat). ``distill_step_ratio`` times Histo-DD and DM
steps on the 4N store with the real patches streamed through a ``cache_mb`` reservoir against
the whole split held in memory (same process, same seeds, interleaved, best of 5). Each child
starts the allocator trimmer as every rule does (histodistill.memory); the Histo-DD stage is also
run without it to show why (``..._untrimmed``), and ``trimmer_time_ratio`` is its time with the
trimmer over without (N store, interleaved, best of 2).

``--smoke``: a check that the bench still runs (the test suite's), in seconds: stores of 48 and
192 patches of 32 px, a 0.2 MB cache (the larger store streams), ConvNets of width 8, ipc 2,
single iterations and epochs, one repeat, one thread, every stage run in this process (not a
fresh one: peak memory is then not per stage, and the ratios mean nothing); figures go to
results/bench/smoke/memory.txt.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _child import child_result  # noqa: E402  (bench/_child.py, beside this script)
from histodistill import config  # noqa: E402

# complete settings, as the library takes them: the schema's defaults with the bench's values
AUGMENT, TRAIN = config.defaults("$defs/augment"), config.defaults("$defs/train")
HISTODD = {**config.defaults("distill.methods.histodd"), "outer_loop": 2, "inner_loop": 2, "lr_img": 0.5,
           "unit_grad": True, "lr_net": 0.01, "alpha": [0.01, 0.09], "n_data": 128, "batch_real": 64, "batch_net": 64,
           "augment": {**AUGMENT, "preset": "flip"}, "checkpoint_every": 100}
DM = {**config.defaults("distill.methods.dm"), "net": "convnet", "net_kwargs": {"width": 32}, "iterations": 5,
      "lr_img": 1.0, "batch_real": 128, "augment": {**AUGMENT, "preset": "dsa"}, "checkpoint_every": 100}
POOL = {"net": "convnet", "net_kwargs": {"width": 32}, "size": 1,
        "train": {**TRAIN, "epochs": 1, "batch": 128, "schedule": "constant"}, "save_epochs": [1],
        "augment": {**AUGMENT, "preset": "dsa"}}
EVALUATE = {**config.defaults("evaluate"), "archs": ["convnet"], "arch_kwargs": {"convnet": {"width": 32}},
            "runs": 1, "seed": 0, "train": {**TRAIN, "epochs": 20, "batch": 256},
            "full": {**TRAIN, "epochs": 1, "batch": 256}, "augment": {**AUGMENT, "preset": "dsa"},
            "stain_norm": False, "cache_mb": 24}
# --smoke: store size and what each stage's settings shrink to
SMOKE = {"n": 48, "size": 32, "ipc": 2, "cache_mb": 0.2,
         "histodd": {"outer_loop": 1, "inner_loop": 1, "n_data": 16, "batch_real": 8, "batch_net": 8},
         "dm": {"iterations": 1, "batch_real": 8, "net_kwargs": {"width": 8}},
         "pool": {"net_kwargs": {"width": 8}},
         "evaluate": {"train": {**TRAIN, "epochs": 1, "batch": 256}, "arch_kwargs": {"convnet": {"width": 8}}}}


def stage_settings(smoke: bool) -> dict[str, dict]:
    """The Histo-DD, DM, pool and evaluation settings of the stages (``smoke``: shrunk)."""
    cfgs = {"histodd": HISTODD, "dm": DM, "pool": POOL, "evaluate": EVALUATE}
    if smoke:
        cfgs = {k: {**v, **SMOKE.get(k, {})} for k, v in cfgs.items()}
    return cfgs


def make_store(path: Path, n: int, size: int = 64, seed: int = 0) -> Path:
    """Three classes of textured patches, 80 % train and 20 % test, interleaved."""
    from histodistill.data.stream import record_channel_stats
    from histodistill.data.store import SPLITS, StoreWriter

    rng = np.random.default_rng(seed)
    writer = StoreWriter(path, size, attrs={"class_names": ["a", "b", "c"], "slides": [],
                                            "split_names": list(SPLITS), "patch_size": size})
    for start in range(0, n, 1024):
        m = min(1024, n - start)
        y = rng.integers(0, 3, m)
        x = rng.integers(0, 120, (m, 3, size, size)) + (y * 60)[:, None, None, None]
        split = np.where(rng.random(m) < 0.8, 0, 2)
        writer.append(x.astype(np.uint8), np.full((m, 2), -1), np.full(m, -1), y, split)
    record_channel_stats(path)
    return path


def outputs(work: Path, stem: str) -> dict[str, Path]:
    """The set, grid and cost files of one distillation in ``work``."""
    return {"zarr": work / f"{stem}.zarr", "grid": work / f"{stem}.png", "cost": work / f"{stem}.json"}


def stage(name: str, store: str, work: str, cache_mb: float, untrimmed: bool,
          smoke: bool = False) -> None:
    """Run one stage in this (child) process and print its peak RSS in MB and its seconds. Like
    every rule, it starts the allocator trimmer first, unless ``untrimmed``."""
    import torch

    from histodistill.memory import start_trimmer

    if not untrimmed:
        start_trimmer()
    start = time.perf_counter()

    from histodistill.distill.run import distill, pretrain_pool
    from histodistill.evaluate import evaluate_distilled, full_train

    torch.set_num_threads(1 if smoke else 2)
    w = Path(work)
    cfgs, ipc = stage_settings(smoke), SMOKE["ipc"] if smoke else 10
    if name == "distill_histodd":
        pretrain_pool(store, None, w / "pool.pt", cfg=cfgs["pool"], seed=0, cache_mb=cache_mb)
        distill("histodd", ipc, cfgs["histodd"], 0, outputs(w, "h"), store_path=store,
                pool_path=w / "pool.pt", cache_mb=cache_mb, progress=False)
    elif name == "distill_dm":
        distill("dm", ipc, cfgs["dm"], 0, outputs(w, "d"), store_path=store, cache_mb=cache_mb,
                progress=False)
    else:
        full_train(store, None, "convnet", cfg=cfgs["evaluate"], out=w / "full.json")
        distill("random", ipc, {}, 0, outputs(w, "r"), store_path=store, cache_mb=cache_mb,
                progress=False)
        evaluate_distilled(w / "r.zarr", w / "r.json", store_path=store, template_path=None,
                           full={"convnet": w / "full.json"}, cfg=cfgs["evaluate"],
                           dataset="bench", out=w / "result.json")
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "seconds": time.perf_counter() - start}))


def run_stage(name: str, store: Path, cache_mb: float, untrimmed: bool = False,
              smoke: bool = False) -> dict[str, float]:
    """Peak RSS (MB) and seconds of one stage in a fresh process (``smoke``: in this one, at
    the smoke settings)."""
    flags = ["--untrimmed"] * untrimmed + ["--smoke"] * smoke
    with tempfile.TemporaryDirectory() as work:
        argv = ["--stage", name, "--store", str(store), "--work", work, "--cache-mb", str(cache_mb), *flags]
        return child_result(__file__, main, argv, fresh=not smoke)


def step_ratio(store: Path, cache_mb: float, repeats: int = 5, smoke: bool = False
               ) -> dict[str, float]:
    """Seconds per step, streamed through ``cache_mb`` over resident, for Histo-DD and DM."""
    import torch

    from histodistill import models
    from histodistill.data.real import RealData
    from histodistill.distill import Context, build
    from histodistill.data.store import PatchStore

    torch.set_num_threads(1 if smoke else 2)
    ps = PatchStore(store)
    torch.manual_seed(0)
    cfgs, ipc = stage_settings(smoke), SMOKE["ipc"] if smoke else 10
    kwargs = cfgs["pool"]["net_kwargs"]
    net = models.build("convnet", 3, int(ps.attrs["patch_size"]), **kwargs)
    pool = {"net": "convnet", "net_kwargs": kwargs, "states": [net.state_dict()]}
    runs = {}
    for mode, mb in (("streamed", cache_mb), ("in_memory", 1e6)):
        real = RealData(ps, "train", mb, 0, torch.device("cpu"))
        assert real.sampler.resident == (mode == "in_memory")
        for method in ("histodd", "dm"):
            d = build(method, cfgs[method], ipc, Context(real, 0, None, None, pool, progress=False))
            d.init_state()
            runs[(method, mode)] = d
    best: dict[tuple[str, str], float] = {}
    for it in range(repeats):  # interleaved: load drifts hit both modes alike
        for key, d in runs.items():
            start = time.perf_counter()
            d.step(it)
            best[key] = min(best.get(key, float("inf")), time.perf_counter() - start)
    return {m: best[(m, "streamed")] / best[(m, "in_memory")] for m in ("histodd", "dm")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--cache-mb", type=float, default=24.0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: check the bench runs")
    parser.add_argument("--stage")
    parser.add_argument("--store")
    parser.add_argument("--work")
    parser.add_argument("--untrimmed", action="store_true")
    args = parser.parse_args(argv)
    if args.stage:
        stage(args.stage, args.store, args.work, args.cache_mb, args.untrimmed, args.smoke)
        return
    from histodistill.io import save_figures

    smoke, size, repeats, out = args.smoke, 64, 2, ROOT / "results/bench/memory.txt"
    if smoke:
        args.n, size, args.cache_mb = SMOKE["n"], SMOKE["size"], SMOKE["cache_mb"]
        repeats, out = 1, ROOT / "results/bench/smoke/memory.txt"
    with tempfile.TemporaryDirectory() as tmp:
        small = make_store(Path(tmp) / "n.zarr", args.n, size)
        large = make_store(Path(tmp) / "4n.zarr", 4 * args.n, size)
        mb = 3 * size * size / 2**20
        print(f"stores: {args.n} and {4 * args.n} patches of {size} px ({args.n * mb:.0f} and "
              f"{4 * args.n * mb:.0f} MB of pixels); cache_mb {args.cache_mb}")
        ratios = {}
        for name in ("distill_histodd", "distill_dm", "evaluate"):
            a, b = (run_stage(name, small, args.cache_mb, smoke=smoke)["peak_rss_mb"],
                    run_stage(name, large, args.cache_mb, smoke=smoke)["peak_rss_mb"])
            print(f"{name}: peak RSS {a:.0f} MB (N) vs {b:.0f} MB (4N)")
            ratios[name] = b / a
        # the same Histo-DD stage without the trimmer (glibc keeps freed heap)
        untrimmed = [run_stage("distill_histodd", s, args.cache_mb, untrimmed=True, smoke=smoke)
                     for s in (small, large)]
        print(f"distill_histodd, untrimmed: peak RSS {untrimmed[0]['peak_rss_mb']:.0f} MB (N) "
              f"vs {untrimmed[1]['peak_rss_mb']:.0f} MB (4N)")
        ratios["untrimmed"] = untrimmed[1]["peak_rss_mb"] / untrimmed[0]["peak_rss_mb"]
        # the time the trimmer costs: with and without, interleaved on the N store, best of 2
        seconds: dict[bool, float] = {}
        for _ in range(repeats):
            for off in (False, True):
                t = run_stage("distill_histodd", small, args.cache_mb, untrimmed=off, smoke=smoke)["seconds"]
                seconds[off] = min(seconds.get(off, float("inf")), t)
        print(f"distill_histodd (N): {seconds[False]:.1f} s with the trimmer, "
              f"{seconds[True]:.1f} s without (best of {repeats}, interleaved)")
        time_ratio = seconds[False] / seconds[True]
        steps = step_ratio(large, args.cache_mb, 1 if smoke else 5, smoke)
    figures = [
        f"peak_rss_ratio_distill_histodd: {ratios['distill_histodd']:.3f}",
        f"peak_rss_ratio_distill_dm: {ratios['distill_dm']:.3f}",
        f"peak_rss_ratio_distill: {max(ratios['distill_histodd'], ratios['distill_dm']):.3f}",
        f"peak_rss_ratio_evaluate: {ratios['evaluate']:.3f}",
        f"distill_step_ratio_histodd: {steps['histodd']:.3f}",
        f"distill_step_ratio_dm: {steps['dm']:.3f}",
        f"distill_step_ratio: {max(steps.values()):.3f}",
        f"peak_rss_ratio_distill_histodd_untrimmed: {ratios['untrimmed']:.3f}",
        f"trimmer_time_ratio: {time_ratio:.3f}",
    ]
    save_figures(figures, out)


if __name__ == "__main__":
    main()
