"""Trajectory matching cost: seconds per iteration and peak memory of MTT and PTM at N and 4N
student steps, checkpointed unroll against the reference's plain unroll.

Usage: python bench/trajectory.py [--steps 10] [--width 32] [--ipc 10] [--size 32] [--smoke]

Builds a three-class store of ``size`` px patches and a one-expert buffer of ConvNets (instance
norm, ``width``), then runs each configuration in a fresh process: ``repeats`` iterations of the
real ``mtt`` / ``ptm`` distillers (PTM at end point 1 with ``syn_steps`` = N, so both unroll N
steps), after a warm-up iteration of one student step. Memory: on CUDA, the peak of allocated memory during the
iterations above what was allocated before them; on CPU, the process's peak resident set during
the iterations (``VmHWM``, reset through ``/proc/self/clear_refs`` after freed heap is returned
with ``malloc_trim``) above its resident set before them, i.e. the unroll's working set (model,
images and imports excluded). (``ru_maxrss`` would not do: Linux keeps it across ``execve``, so
a child starts with its parent's peak.) ``*_unroll_mem_ratio`` is 4N over N (goal <= 2: memory
sublinear in N); ``plain_unroll_mem_ratio`` is the same for MTT with one segment (the reference's
graph over all steps), and ``checkpoint_time_overhead`` the checkpointed unroll's time over the
plain one at 4N.

``--smoke``: a check that the bench still runs (the test suite's), in seconds: N = 1, ipc 2,
width 8, a 60-patch store, one repeat, one thread, every configuration run in this process
(not a fresh one: the memory figures then mean nothing); figures go to
results/bench/smoke/trajectory.txt.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from memory import AUGMENT, TRAIN, make_store  # noqa: E402  (bench/memory.py, beside this script)

from _child import child_result  # noqa: E402  (bench/_child.py, beside this script)
from histodistill import config  # noqa: E402

BUFFER = {"experts": 1, "epochs": 2, "net": "convnet",
          "train": {**TRAIN, "lr": 0.01, "momentum": 0, "weight_decay": 0, "batch": 256,
                    "schedule": "constant"}, "augment": {**AUGMENT, "preset": "dsa"}, "dtype": "float32"}
COMMON = {"iterations": 1000, "lr_img": 100, "lr_lr": 1e-5, "lr_teacher": 0.01,
          "augment": {**AUGMENT, "preset": "dsa"}, "checkpoint_every": 10**6}
SMOKE = {"steps": 1, "ipc": 2, "width": 8, "repeats": 1, "threads": 1, "patches": 60}


def settings(method: str, steps: int, segment: int) -> dict:
    if method == "mtt":
        return {**config.defaults("distill.methods.mtt"), **COMMON, "syn_steps": steps, "expert_epochs": 1,
                "max_start_epoch": 1, "unroll_segment": segment}
    return {**config.defaults("distill.methods.ptm"), **COMMON, "syn_steps": steps, "end_epoch": 1, "retrain": 0,
            "beta_match": 1.0, "beta_overlap": 0.01, "sigma": 1.0, "unroll_segment": segment}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_rss_peak() -> int:
    """Return freed heap to the system, reset this process's peak resident set (VmHWM) to its
    current size and return that size in bytes (Linux)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS") * 1024


def child(args: argparse.Namespace) -> None:
    """Time ``args.repeats`` iterations of one configuration; print seconds and peak MB."""
    import torch

    from histodistill.data.real import RealData
    from histodistill.data.store import PatchStore
    from histodistill.distill import Context, build
    from histodistill.runtime import device

    torch.set_num_threads(args.threads)
    dev = device()
    real = RealData(PatchStore(args.store), "train", 64, 0, dev)
    d = build(args.child, settings(args.child, args.steps, args.segment), args.ipc,
              Context(real, 0, None, None, {}, False, "", experts=Path(args.experts)))
    d.init_state()
    d.cfg["syn_steps"] = 1  # warm-up with one student step: the kernels' one-time allocations
    d.step(0)
    d.cfg["syn_steps"] = args.steps
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_rss_peak()
    times = []
    for it in range(1, args.repeats + 1):
        start = time.perf_counter()
        d.step(it)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_kb("VmHWM") * 1024 - base
    print(json.dumps({"seconds": min(times), "peak_mb": peak / 2**20, "device": str(dev)}))


def measure(args: argparse.Namespace, store: Path, experts: Path, method: str, steps: int,
            segment: int) -> dict:
    """One configuration's seconds and peak memory, in a fresh process (in this one when
    ``args.smoke``)."""
    argv = ["--child", method, "--store", str(store), "--experts", str(experts), "--steps",
            str(steps), "--segment", str(segment), "--ipc", str(args.ipc), "--repeats",
            str(args.repeats), "--threads", str(args.threads)]
    return child_result(__file__, main, argv, fresh=not args.smoke)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="N (4N is run too)")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child")
    parser.add_argument("--store")
    parser.add_argument("--experts")
    parser.add_argument("--segment", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: check the bench runs")
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    from histodistill.io import save_figures
    from histodistill.trajectories.buffer import buffer_experts

    patches, out = 3 * max(args.ipc, 64) * 5 // 4, ROOT / "results" / "bench" / "trajectory.txt"
    if args.smoke:
        args.steps, args.ipc, args.width, args.repeats, args.threads = (
            SMOKE[k] for k in ("steps", "ipc", "width", "repeats", "threads"))
        import torch

        torch.set_num_threads(args.threads)
        patches, out = SMOKE["patches"], ROOT / "results" / "bench" / "smoke" / "trajectory.txt"
    n = args.steps
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "p.zarr", patches, args.size)
        experts = Path(tmp) / "convnet.h5"
        buffer_experts(store, experts, {**BUFFER, "net_kwargs": {"width": args.width}}, seed=0,
                       cache_mb=config.defaults("trajectories")["cache_mb"], progress=False)
        runs = {}
        for method in ("mtt", "ptm"):
            for steps in (n, 4 * n):
                runs[method, steps] = measure(args, store, experts, method, steps, 0)
        for steps in (n, 4 * n):
            runs["plain", steps] = measure(args, store, experts, "mtt", steps, steps)
    figures = []
    for method in ("mtt", "ptm"):
        for steps, tag in ((n, "N"), (4 * n, "4N")):
            r = runs[method, steps]
            figures += [f"{method}_seconds_per_iteration_{tag}: {r['seconds']:.3f}",
                        f"{method}_peak_mem_mb_{tag}: {r['peak_mb']:.1f}"]
    for steps, tag in ((n, "N"), (4 * n, "4N")):
        figures.append(f"plain_peak_mem_mb_{tag}: {runs['plain', steps]['peak_mb']:.1f}")
    ratio = {m: runs[m, 4 * n]["peak_mb"] / max(runs[m, n]["peak_mb"], 1e-9)
             for m in ("mtt", "ptm", "plain")}
    overhead = runs["mtt", 4 * n]["seconds"] / runs["plain", 4 * n]["seconds"]
    figures += [f"N: {n}", f"device: {runs['mtt', n]['device']}",
                f"plain_unroll_mem_ratio: {ratio['plain']:.2f}",
                f"checkpoint_time_overhead: {overhead:.2f}",
                f"mtt_unroll_mem_ratio: {ratio['mtt']:.2f}",
                f"ptm_unroll_mem_ratio: {ratio['ptm']:.2f}",
                f"unroll_mem_ratio: {max(ratio['mtt'], ratio['ptm']):.2f}"]
    save_figures(figures, out)


if __name__ == "__main__":
    main()
