"""Device check: the pipeline's costly loops timed on one device (a lent GPU, or the CPU).

Usage: python bench/device.py [--device cuda|cpu] [--smoke] [--sizes 128,256] [--budget-s 300]
                              [--work DIR] [--figures PATH] [--out PATH]
       python bench/device.py --summarise --cuda-figures A.txt --cpu-figures B.txt
                              [--gpu-log util.csv] --out results/bench/device.txt
(`bash bench/device.sh` runs both: the GPU run, the same measurements on the CPU where the
time allows, and the summary side by side; `bash bench/device.sh --cpu` is the CPU smoke run.)

Everything runs on inputs this script builds in ``--work`` (a temporary folder by default):
patch stores of tissue-like random uint8 patches (two classes, written with the library's
StoreWriter), a Histo-DD pool of untrained networks in the pool file format, one MTT expert
buffer of random-walk trajectories written with the trajectory store's writer, a stain template
(Macenko's reference H&E matrix) and an untrained autoencoder. Timing does not depend on trained
weights. Settings are the paper's: the schema's defaults as the ``camelyon16`` dataset resolves
them (``distill.methods.*``, ``distill.pool``, ``trajectories``, ``evaluate``) at ipc 10;
the generator's are the PCam profile's (configs/pcam.yaml) with the U-ViT ``small`` preset.
Each measurement runs a warm-up first; on CUDA every timed region ends with a synchronize.
For every patch size S of ``--sizes``:
  stream_patches_per_s_Spx     - one shuffled epoch of histodistill.data.stream.iterate over the
                                 store's training split (about 128 MiB; batch 256, 256 MiB
                                 shuffle buffer);
  stream_to_device_patches_per_s_Spx - the same, each batch copied to the device;
  sampler_patches_per_s_Spx    - ClassSampler.batch draws of 64 (Histo-DD's real batches)
                                 through a 64 MiB reservoir;
  evaluate_epoch_s_Spx         - one epoch of the evaluate stage's training (its ConvNet on an
                                 ipc x classes set, histodistill.training.train, DSA);
  dm_iteration_s_Spx           - one DM iteration (distill.build("dm"));
  mtt_iteration_s_Spx          - one MTT iteration (30 student steps at ipc 10);
  histodd_outer_loop_s_Spx     - one Histo-DD outer loop at U = 100 inner iterations (ResNetAP-10
                                 pool). Loops of U = a and U = b inner iterations are timed and
                                 the loop's cost extrapolated linearly in U; a full U = 100 loop
                                 is run when that estimate fits ``--full-loop-max-s`` and the
                                 time left. ``histodd_measured_inner_Spx`` is the U actually run
                                 in one loop (below 100: extrapolated);
  histodd_outer_loop_vs_paper_v100_Spx - that over the paper's "about 6 minutes" per outer loop
                                 on a V100 (360 s); the unsuffixed line is the largest size's.
and uvit_<preset>_train_steps_per_s: train_generator steps per second at the PCam generator's
geometry (32 px, f2 autoencoder, 2 x 2 latent patches, batch 64), from two runs of different
step counts (their difference: no start-up cost). On CUDA, each measurement's peak allocated
memory is reported (``*_cuda_peak_mb``).

``--smoke`` shrinks everything (32 px, batches of 16-32, narrow networks, few steps, U-ViT
``tiny``, U = 1 and 2 extrapolated to 100) to check the code in seconds: its figures say
nothing about paper-scale cost. ``--budget-s`` skips the measurements still to come once that
many seconds have passed (cheap ones run first); figures are appended to ``--figures`` as they
are measured, so a run stopped by a time limit keeps what it measured. The last lines printed
are ``name: value`` (also saved to ``--out``; smoke runs default to results/bench/smoke/).
"""

from __future__ import annotations

import os
import sys

# --device cpu must hide a GPU before torch is imported: the generator's training picks its
# device itself (histodistill.runtime.device)
if any(a in ("--device=cpu",) for a in sys.argv) or (
        "--device" in sys.argv[:-1] and sys.argv[sys.argv.index("--device") + 1] == "cpu"):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import argparse  # noqa: E402
import csv  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from histodistill import config, models  # noqa: E402
from histodistill.augment import Augment, AugmentConfig  # noqa: E402
from histodistill.data.real import RealData  # noqa: E402
from histodistill.data.store import SPLITS, PatchStore, StoreWriter  # noqa: E402
from histodistill.data.stream import ClassSampler, iterate, record_channel_stats  # noqa: E402
from histodistill.distill import Context, build  # noqa: E402
from histodistill.distill.run import context  # noqa: E402
from histodistill.generate.autoencoder import AutoencoderKL  # noqa: E402
from histodistill.generate.generator import train_generator  # noqa: E402
from histodistill.generate.train import save_model  # noqa: E402
from histodistill.io import save_figures  # noqa: E402
from histodistill.stain import StainTemplate  # noqa: E402
from histodistill.state import load_state, save_state  # noqa: E402
from histodistill.training import Inputs, TrainConfig, tensor_batches, train  # noqa: E402
from histodistill.trajectories.store import write_store  # noqa: E402
from histodistill.trajectories.unroll import Student  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
IPC = 10
DATASET = "camelyon16"  # no method overrides: its settings are the schema's (the papers')
PAPER_V100_OUTER_LOOP_S = 360.0  # Histo-DD: "about 6 minutes" per outer loop on a V100
CLASSES = ["normal", "tumor"]
# Macenko's reference H&E stain matrix and maximum concentrations (rows: hematoxylin, eosin)
TEMPLATE = StainTemplate([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]], [1.9705, 1.0308])
SMOKE_MTT = {"syn_steps": 3, "max_start_epoch": 2, "expert_epochs": 1}
Figures = dict[str, float | int | str]


class Run:
    """The run's device, settings, clock, budget and figures (appended to a file as they come)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.dev = torch.device(args.device)
        self.smoke, self.budget = bool(args.smoke), float(args.budget_s)
        self.full_loop_max_s = float(args.full_loop_max_s)
        self.start = time.perf_counter()
        self.figures: Figures = {}
        self.failed: list[str] = []
        self.figures_path = Path(args.figures) if args.figures else None
        if self.figures_path is not None:
            self.figures_path.parent.mkdir(parents=True, exist_ok=True)
            self.figures_path.write_text("")
        cfg = config.load(config.CONFIG)
        self.distill = config.section(cfg, DATASET, "distill")
        self.trajectories = config.section(cfg, DATASET, "trajectories")
        self.evaluate = config.section(cfg, DATASET, "evaluate")
        pcam = config.load(config.CONFIG, *config.overlays("pcam"))
        self.generate = config.section(pcam, "pcam", "generate")
        self.pcam_size = int(config.dataset(pcam, "pcam")["patch_size"])
        self.method = {m: config.method_config(cfg, DATASET, m, IPC) for m in ("histodd", "dm", "mtt")}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], object]) -> float:
        """Seconds of ``fn()``, the device synchronised before and after."""
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def add(self, figures: Figures, label: str = "") -> None:
        """Keep figures; report them as a comment line (the `name: value` lines come last)."""
        self.figures.update(figures)
        lines = [f"{k}: {fmt(v)}" for k, v in figures.items()]
        print(f"# {label}{', '.join(lines)}", flush=True)
        if self.figures_path is not None:
            with open(self.figures_path, "a") as f:
                f.write("".join(line + "\n" for line in lines))

    def measure(self, name: str, fn: Callable[[], Figures]) -> None:
        """Run one measurement unless the budget is spent; on CUDA add its peak memory."""
        if self.elapsed() > self.budget:
            print(f"# {name}: skipped ({self.elapsed():.0f} s > budget {self.budget:.0f} s)", flush=True)
            return
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            figures = fn()
        except Exception as err:  # one failure (e.g. out of memory at 256 px) keeps the others
            if self.smoke:
                raise
            self.failed.append(name)
            print(f"# {name}: failed after {time.perf_counter() - start:.1f} s: "
                  f"{type(err).__name__}: {str(err)[:300]}", flush=True)
            return
        if self.dev.type == "cuda":
            figures[f"{name}_cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        self.add(figures, f"{name} ({time.perf_counter() - start:.1f} s): ")


def fmt(value: float | int | str) -> str:
    if isinstance(value, str) or isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


# --- inputs --------------------------------------------------------------------------------

def tissue_patches(rng: np.random.Generator, n: int, size: int, label: np.ndarray) -> np.ndarray:
    """``n`` (3, size, size) uint8 patches that look vaguely like H&E: a pink background with
    blotches of purple 'nuclei' (denser for class 1) at 1/8 of the resolution, and pixel noise."""
    cell = max(size // 8, 1)
    low = rng.random((n, 1, -(-size // cell), -(-size // cell)))
    density = np.kron(low, np.ones((1, 1, cell, cell)))[:, :, :size, :size]
    density = (density > 0.55 - 0.15 * label[:, None, None, None]).astype(np.float32)
    pink = np.array([232, 182, 214], np.float32)[None, :, None, None]
    purple = np.array([96, 52, 140], np.float32)[None, :, None, None]
    x = pink * (1 - density) + purple * density + rng.integers(-20, 21, (n, 3, size, size), dtype=np.int8)
    return np.clip(x, 0, 255).astype(np.uint8)


def make_store(path: Path, size: int, n: int, seed: int = 0) -> Path:
    """A two-class store of ``n`` tissue-like patches (90 % train, 10 % test, classes
    interleaved) with its channel statistics, as the pipeline builds stores. Built once per
    work folder (written under a temporary name, then renamed)."""
    if (path / "zarr.json").exists():
        return path
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed)
    writer = StoreWriter(tmp, size, attrs={"class_names": CLASSES, "split_names": list(SPLITS),
                                           "slides": [], "patch_size": size})
    for start in range(0, n, 256):
        m = min(256, n - start)
        y = (np.arange(start, start + m) % 2).astype(np.int64)
        split = np.where(np.arange(start, start + m) % 10 == 9, SPLITS.index("test"), 0)
        writer.append(tissue_patches(rng, m, size, y), np.full((m, 2), -1), np.full(m, -1), y, split)
    record_channel_stats(tmp)
    tmp.rename(path)
    return path


def store_rows(size: int, smoke: bool) -> int:
    """Rows of a store: about 128 MiB of patches, 1,024 to 8,192 rows (smoke: 512)."""
    if smoke:
        return 512
    return int(min(8192, max(1024, 128 * 2**20 // (3 * size * size))))


def write_pool(path: Path, net: str, net_kwargs: dict[str, Any], size: int, n: int = 2) -> Path:
    """A Histo-DD pool of ``n`` untrained networks in the pool file format (rule pretrain_pool)."""
    states = []
    for k in range(n):
        torch.manual_seed(k)
        states.append(models.build(net, len(CLASSES), size, **net_kwargs).state_dict())
    save_state({"net": net, "net_kwargs": net_kwargs, "states": states}, path)
    return path


def write_buffer(path: Path, cfg: dict[str, Any], size: int, epochs: int, experts: int = 1) -> Path:
    """An expert buffer of random-walk trajectories in the trajectory store's format (rule
    buffer_experts'); MTT's cost does not depend on what the experts learnt."""
    torch.manual_seed(0)
    net = models.build(cfg["net"], len(CLASSES), size, **cfg["net_kwargs"])
    student = Student(net)
    theta = student.flat().numpy()
    rng = np.random.default_rng(0)

    def trajectories() -> Any:
        for _ in range(experts):
            steps = rng.normal(0, 1e-3, (epochs, student.num_params)).astype(np.float32)
            yield np.concatenate([theta[None], theta[None] + np.cumsum(steps, 0)])

    attrs = {"net": cfg["net"], "net_kwargs": cfg["net_kwargs"], "num_classes": len(CLASSES),
             "im_size": size, "param_names": student.names,
             "param_shapes": [list(s) for s in student.shapes], "settings": cfg, "seed": 0,
             "key": f"device-bench-{size}-{epochs}", "class_names": CLASSES, "source_store": ""}
    write_store(path, trajectories(), experts, epochs, student.num_params, "float32", attrs)
    return path


# --- measurements ----------------------------------------------------------------------------

def stream(run: Run, store: Path, size: int) -> Figures:
    """Patches per second out of the store: shuffled epochs of ``iterate``, to the host and to
    the device, and ClassSampler draws through a reservoir smaller than the store."""
    patch_store = PatchStore(store)
    for _ in iterate(patch_store, "train", 256, 0, 256):  # warm-up: the page cache, zarr's codecs
        pass

    def epoch(to_device: bool) -> int:
        n = 0
        for x, _, _ in iterate(patch_store, "train", 256, 1, 256):
            if to_device:
                torch.from_numpy(x).to(run.dev, non_blocking=True)
            n += len(x)
        return n

    n = len(patch_store.indices("train"))
    host = run.timed(lambda: epoch(False))
    device = run.timed(lambda: epoch(True))
    sampler = ClassSampler(patch_store, "train", 64, 0)
    draws = 8 if run.smoke else 64
    sample = run.timed(lambda: [sampler.batch(k % 2, 64) for k in range(draws)])
    return {f"stream_patches_per_s_{size}px": n / host,
            f"stream_to_device_patches_per_s_{size}px": n / device,
            f"sampler_patches_per_s_{size}px": draws * 64 / sample}


def evaluate_epoch(run: Run, store: Path, size: int) -> Figures:
    """Seconds per epoch of the evaluate stage's training of its ConvNet on an ipc x classes
    set (the DC/DSA protocol: SGD, batch 256, DSA per image)."""
    cfg = run.evaluate
    arch = "convnet"
    kwargs = {"width": 32} if run.smoke else cfg["arch_kwargs"].get(arch, {})
    inputs = Inputs(PatchStore(store), None, False, run.dev)
    real = RealData(PatchStore(store), "train", 64, 0, run.dev)
    rows = real.initial_rows(IPC, 0)
    x = inputs(real.pixels_of(rows))
    y = torch.arange(len(CLASSES), device=run.dev).repeat_interleave(IPC)
    aug = Augment(AugmentConfig.from_config(cfg["augment"]), None, inputs.stats.mean, inputs.stats.std)
    epochs = 3 if run.smoke else 50 if run.dev.type == "cuda" else 10
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = models.build(arch, len(CLASSES), size, **kwargs).to(run.dev)
    base = {**cfg["train"]}

    def fit(n: int) -> None:  # with the training curve the stage keeps (a sync per batch)
        train(net, tensor_batches(x, y, int(base["batch"]), gen),
              TrainConfig.from_config({**base, "epochs": n}), gen, aug, curve={})

    fit(1)  # warm-up
    epoch_s = run.timed(lambda: fit(epochs)) / epochs
    return {f"evaluate_epoch_s_{size}px": epoch_s,
            f"evaluate_train_run_s_{size}px": epoch_s * int(base["epochs"])}


def distiller(run: Run, method: str, cfg: dict[str, Any], ctx: Context) -> Any:
    d = build(method, {**cfg, "checkpoint_every": 10**9}, IPC, ctx)
    d.init_state()
    return d


def iteration_time(run: Run, d: Any, repeats: int) -> float:
    d.step(0)  # warm-up
    run.sync()
    return statistics.median(run.timed(lambda: d.step(it)) for it in range(1, repeats + 1))


def dm(run: Run, ctx: Context, size: int) -> Figures:
    cfg = dict(run.method["dm"])
    if run.smoke:
        cfg.update(batch_real=32, net_kwargs={"width": 32})
    repeats = 2 if run.smoke else 10 if run.dev.type == "cuda" else 2
    return {f"dm_iteration_s_{size}px": iteration_time(run, distiller(run, "dm", cfg, ctx), repeats)}


def mtt(run: Run, ctx: Context, size: int) -> Figures:
    cfg = dict(run.method["mtt"])
    if run.smoke:
        cfg.update(SMOKE_MTT)
    repeats = 5 if run.dev.type == "cuda" else 1
    return {f"mtt_iteration_s_{size}px": iteration_time(run, distiller(run, "mtt", cfg, ctx), repeats)}


def histodd(run: Run, ctx: Context, size: int, probes: tuple[int, int]) -> Figures:
    """One outer loop at the paper's U: loops of U = a and U = b timed, the rest linear in U
    (the inner iterations are alike; the loop's fixed cost is drawing and perturbing the
    network); a full loop when its estimate fits the time allowed."""
    cfg = dict(run.method["histodd"])
    full_u = int(cfg["inner_loop"])
    if run.smoke:
        cfg.update(batch_real=16, batch_net=16, n_data=16)
    d = distiller(run, "histodd", cfg, ctx)
    d.cfg["inner_loop"] = 1
    d.step(0)  # warm-up
    a, b = probes
    d.cfg["inner_loop"] = a
    t_a = run.timed(lambda: d.step(1))
    d.cfg["inner_loop"] = b
    t_b = run.timed(lambda: d.step(2))
    per = (t_b - t_a) / (b - a)
    fixed = t_a - a * per
    if per <= 0 or fixed < 0:  # noise larger than the fixed cost: take it as none
        per, fixed = t_b / b, 0.0
    outer, measured = fixed + full_u * per, b
    left = run.budget - run.elapsed() - 10
    if not run.smoke and outer <= min(run.full_loop_max_s, left) and full_u > b:
        d.cfg["inner_loop"] = full_u
        outer, measured = run.timed(lambda: d.step(3)), full_u
    return {f"histodd_outer_loop_s_{size}px": outer,
            f"histodd_inner_iteration_s_{size}px": per,
            f"histodd_measured_inner_{size}px": measured,
            f"histodd_outer_loop_vs_paper_v100_{size}px": outer / PAPER_V100_OUTER_LOOP_S}


def uvit_steps(run: Run, work: Path) -> Figures:
    """train_generator steps per second at the PCam generator's geometry, from runs of k1 and
    k2 steps (after a one-step warm-up run): (k2 - k1) / (seconds(k2) - seconds(k1))."""
    preset = "tiny" if run.smoke else "small"
    size = run.pcam_size
    store = make_store(work / f"uvit_{size}.zarr", size, 512, seed=1)
    ae_cfg = run.generate["autoencoder"]
    torch.manual_seed(0)
    ae = AutoencoderKL.from_config(ae_cfg, size)
    ae_path = work / "autoencoder.pt"
    save_model(ae_path, {"config": ae_cfg, "image_size": size, "state": ae.state_dict()})
    cfg = {**run.generate["generator"], "preset": preset}
    if run.smoke:
        cfg["batch"] = 8
    out = work / "uvit.pt"

    def seconds(steps: int) -> float:
        train_generator(store, ae_path, out, cfg={**cfg, "steps": steps}, mode="cond", seed=0,
                        checkpoint_every=run.generate["checkpoint_every"],
                        cache_mb=run.generate["cache_mb"], progress=False)
        return float(load_state(out)["seconds"])

    k1, k2 = (1, 3) if run.smoke or run.dev.type == "cpu" else (5, 55)
    seconds(1)  # warm-up
    t1, t2 = seconds(k1), seconds(k2)
    return {f"uvit_{preset}_train_steps_per_s": (k2 - k1) / max(t2 - t1, 1e-9),
            f"uvit_{preset}_batch": int(cfg["batch"])}


def bench(run: Run, sizes: list[int], work: Path) -> None:
    dev = run.dev
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    run.add({"device": f"{dev.type} ({name}, {torch.get_num_threads()} threads)",
             "smoke": int(run.smoke), "ipc": IPC})
    template = work / "template.json"
    TEMPLATE.save(template)
    pool_cfg = dict(run.distill["pool"])
    traj = dict(run.trajectories)
    if run.smoke:
        pool_cfg["net_kwargs"] = {"width": 16}
        traj["net_kwargs"] = {"width": 32}
    mtt_cfg = run.method["mtt"]
    if run.smoke:
        mtt_cfg = {**mtt_cfg, **SMOKE_MTT}
    epochs = int(mtt_cfg["max_start_epoch"]) - 1 + int(mtt_cfg["expert_epochs"])  # the farthest target
    stores, contexts = {}, {}
    for size in sizes:
        stores[size] = make_store(work / f"patches_{size}.zarr", size, store_rows(size, run.smoke))
        pool = write_pool(work / f"pool_{size}.pt", pool_cfg["net"], pool_cfg["net_kwargs"], size)
        experts = write_buffer(work / f"experts_{size}.h5", traj, size, epochs)
        # on the device histodistill.runtime.device() names (a GPU is hidden for --device cpu)
        contexts[size] = context(stores[size], template, pool, 0, cache_mb=1024, progress=False,
                                 experts=experts)
    print(f"# inputs built ({run.elapsed():.1f} s): stores {[str(s) for s in stores.values()]}", flush=True)
    probes = (1, 2) if run.smoke or dev.type == "cpu" else (2, 6)
    # smallest size first, cheap measurements first: a run stopped by its budget or time limit
    # keeps a complete set for the first size
    for k, size in enumerate(sorted(sizes)):
        run.measure(f"stream_{size}px", lambda: stream(run, stores[size], size))
        run.measure(f"evaluate_{size}px", lambda: evaluate_epoch(run, stores[size], size))
        run.measure(f"dm_{size}px", lambda: dm(run, contexts[size], size))
        run.measure(f"mtt_{size}px", lambda: mtt(run, contexts[size], size))
        run.measure(f"histodd_{size}px", lambda: histodd(run, contexts[size], size, probes))
        if k == 0:
            run.measure("uvit", lambda: uvit_steps(run, work))
    measured = [s for s in sizes if f"histodd_outer_loop_vs_paper_v100_{s}px" in run.figures]
    if measured:
        largest = max(measured)
        run.add({"histodd_outer_loop_vs_paper_v100": run.figures[f"histodd_outer_loop_vs_paper_v100_{largest}px"],
                 "paper_v100_outer_loop_s": PAPER_V100_OUTER_LOOP_S})
    run.add({"bench_s": run.elapsed()})


# --- summary -----------------------------------------------------------------------------------

def read_figures(path: str | None) -> dict[str, str]:
    if not path or not Path(path).exists():
        return {}
    out = {}
    for line in Path(path).read_text().splitlines():
        if ": " in line and not line.startswith("#"):
            key, value = line.split(": ", 1)
            out[key.strip()] = value.strip()
    return out


def number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def gpu_log(path: str | None) -> Figures:
    """Mean and max GPU utilisation and max memory used from nvidia-smi's CSV samples."""
    if not path or not Path(path).exists():
        return {}
    util, mem = [], []
    with open(path) as f:
        for row in csv.reader(f):
            if len(row) < 2:
                continue
            u, m = (number(c.replace("%", "").replace("MiB", "").strip()) for c in row[:2])
            if u is not None and m is not None:
                util.append(u)
                mem.append(m)
    if not util:
        return {}
    return {"gpu_util_mean_pct": statistics.fmean(util), "gpu_util_max_pct": max(util),
            "gpu_mem_used_max_mib": max(mem), "gpu_util_samples": len(util)}


def summarise(args: argparse.Namespace) -> None:
    """The GPU run's figures beside the CPU run's (cpu/gpu: how many times slower the CPU is),
    then the `name: value` lines: the GPU's, the CPU's prefixed ``cpu_``, and the utilisation."""
    gpu, cpu = read_figures(args.cuda_figures), read_figures(args.cpu_figures)
    names = list(gpu) + [k for k in cpu if k not in gpu]
    print(f"gpu: {gpu.get('device', 'no GPU run')}\ncpu: {cpu.get('device', 'no CPU run')}")
    print(f"{'measurement':44s} {'gpu':>12s} {'cpu':>12s} {'cpu slower x':>12s}")
    for key in names:
        g, c = number(gpu.get(key)), number(cpu.get(key))
        if g is None and c is None:
            continue
        ratio = ""
        if g and c and "per_s" in key:  # a rate
            ratio = f"{g / c:.1f}"
        elif g and c and re.search(r"_s(_|$)", key) and key != "bench_s" and not key.startswith("paper_"):
            ratio = f"{c / g:.1f}"
        print(f"{key:44s} {gpu.get(key, '-'):>12s} {cpu.get(key, '-'):>12s} {ratio:>12s}")
    lines = [f"{k}: {v}" for k, v in gpu.items()]
    lines += [f"cpu_{k}: {v}" for k, v in cpu.items()]
    lines += [f"{k}: {fmt(v)}" for k, v in gpu_log(args.gpu_log).items()]
    save_figures(lines, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code, not the cost")
    parser.add_argument("--sizes", help="patch sizes, comma-separated (default 128,256; smoke 32)")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="skip the measurements still to come after this many seconds")
    parser.add_argument("--full-loop-max-s", type=float, default=100.0,
                        help="run a full Histo-DD outer loop when its estimate is below this")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (0: torch's default; smoke: 1, for a shared, loaded CPU)")
    parser.add_argument("--work", help="folder of the built inputs, reused when present (default: a temporary one)")
    parser.add_argument("--figures", help="append each figure here as it is measured")
    parser.add_argument("--out", help="the final figures (default results/bench/device.txt; "
                                      "smoke: results/bench/smoke/device.txt)")
    parser.add_argument("--summarise", action="store_true", help="print two runs' figures side by side")
    parser.add_argument("--cuda-figures")
    parser.add_argument("--cpu-figures")
    parser.add_argument("--gpu-log", help="nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv samples")
    args = parser.parse_args()
    if args.out is None:
        args.out = str(ROOT / "results/bench" / ("smoke" if args.smoke else "") / "device.txt")
    if args.summarise:
        summarise(args)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu)")
    threads = args.threads or (1 if args.smoke else 0)
    if threads:
        torch.set_num_threads(threads)
    sizes = [int(s) for s in (args.sizes or ("32" if args.smoke else "128,256")).split(",")]
    run = Run(args)
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        bench(run, sizes, Path(args.work))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            bench(run, sizes, Path(tmp))
    save_figures([f"{k}: {fmt(v)}" for k, v in run.figures.items()], args.out)
    if run.failed:
        sys.exit(f"device.py: failed: {', '.join(run.failed)}")


if __name__ == "__main__":
    main()
