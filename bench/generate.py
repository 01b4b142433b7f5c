"""Generator cost: U-ViT training steps and DDIM sampling against the bare network passes.

Usage: python bench/generate.py [--presets tiny,small] [--repeats N] [--out results/bench/generate.txt]
                                [--smoke]

For each preset, on randomly initialised networks (timing does not depend on training), at the
preset's bench geometry (``GEOMETRY``: image size, autoencoder downsampling, U-ViT patch size,
batch) and the default sampling settings of the ``uvit`` generator (50 DDIM steps,
classifier-free guidance, so every step is one network pass on a doubled batch):
  train_step_s        - one generator training step as ``train_generator`` runs it (a batch of
                        real-like patches encoded by the frozen autoencoder, DDPM loss, backward,
                        AdamW, EMA update);
  sample_images_per_s - images per second of ``Generator.sample`` (noise, DDIM loop with CFG,
                        decoding, uint8);
  peak_mem_mb         - peak memory while sampling and training (CUDA: allocated; CPU: RSS
                        growth);
  sampling_vs_forward - sampling time over the bare passes it needs (50 forward passes of the
                        U-ViT on the doubled batch, one decoder pass), best of N, interleaved;
                        goal <= 1.3.
The last lines are `name: value` (the summary figures are the larger preset's).

``--smoke``: a check that the bench still runs (the test suite's), in seconds: the tiny preset
at batch 4, 2 DDIM steps, one repeat, one thread, single training steps on a 16-patch store; figures go to
results/bench/smoke/generate.txt unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill import PeakRSS  # noqa: E402

from histodistill import config  # noqa: E402
from histodistill.generate import uvit  # noqa: E402
from histodistill.generate.autoencoder import AutoencoderKL  # noqa: E402
from histodistill.generate.diffusion import randn  # noqa: E402
from histodistill.generate.generator import train_generator  # noqa: E402
from histodistill.generate.sample import build  # noqa: E402
from histodistill.runtime import device  # noqa: E402
from histodistill.generate.train import save_model  # noqa: E402
from histodistill.io import save_figures  # noqa: E402
from histodistill.state import load_state

ROOT = Path(__file__).resolve().parent.parent
# preset -> (image size, AE downsampling, U-ViT patch size, batch): tiny is the demo's geometry,
# small a 128 px patch at f8 (16 x 16 x 4 latents, 64 tokens)
GEOMETRY = {"tiny": (32, 4, 1, 64), "small": (128, 8, 2, 32), "mid": (256, 8, 2, 32),
            "large": (256, 8, 2, 32)}
AE = {**config.defaults("generate.autoencoder"), "ch": 32, "num_res_blocks": 1, "z_channels": 4}
GENERATOR = config.defaults("generate.generator")  # its schedule: linear
GENERATE = config.defaults("generate")  # checkpoint_every, cache_mb
SAMPLING = {"steps": 50, "eta": 0.0, "cfg_scale": 0.4}
SMOKE = {"batch": 4, "sampling_steps": 2, "train_steps": 1, "store_patches": 16}


def best(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def toy_store(path: Path, size: int, n: int = 256) -> Path:
    """A two-class store of random patches at ``size`` px (timing only)."""
    from histodistill.data.stream import record_channel_stats
    from histodistill.data.store import SPLITS, StoreWriter

    rng = np.random.default_rng(0)
    w = StoreWriter(path, size, attrs={"class_names": ["a", "b"], "split_names": list(SPLITS),
                                       "slides": [], "patch_size": size})
    w.append(rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8), np.full((n, 2), -1),
             np.full(n, -1), np.arange(n) % 2, np.zeros(n))
    record_channel_stats(path)
    return path


def files(tmp: Path, preset: str) -> dict[str, Path]:
    """Untrained autoencoder and class-conditional U-ViT files in the pipeline's format."""
    size, down, patch, _ = GEOMETRY[preset]
    cfg = {**AE, "downsample": down}
    ae = AutoencoderKL.from_config(cfg, size)
    save_model(tmp / "ae.pt", {"config": cfg, "image_size": size, "state": ae.state_dict()})
    gcfg = {**GENERATOR, "preset": preset, "patch_size": patch}
    net = uvit.build(gcfg, ae.z_channels, ae.latent_size, 2)
    save_model(tmp / "uvit.pt", {"config": gcfg, "ema": net.state_dict(), "num_classes": 2,
                                 "class_names": ["a", "b"], "z_channels": ae.z_channels,
                                 "latent_size": ae.latent_size, "image_size": size})
    return {"autoencoder": tmp / "ae.pt", "uvit": tmp / "uvit.pt"}


def peak(fn: Callable[[], None]) -> float:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated() / 2**20
    with PeakRSS() as p:
        fn()
    return p.mb


def bench(preset: str, repeats: int, tmp: Path, smoke: bool = False) -> dict[str, float]:
    """The figures of one preset (``smoke``: at the sizes of ``SMOKE``)."""
    size, _, patch, batch = GEOMETRY[preset]
    sampling = SAMPLING
    if smoke:
        batch, sampling = SMOKE["batch"], {**SAMPLING, "steps": SMOKE["sampling_steps"]}
    dev = device()
    paths = files(tmp, preset)
    gen_model = build("uvit", paths, sampling, dev)
    net, ae = gen_model.net, gen_model.ae
    n = batch
    y = torch.zeros(2 * n, dtype=torch.long, device=dev)
    t = torch.full((2 * n,), 500, device=dev)
    z = randn((2 * n, *gen_model.shape), torch.Generator().manual_seed(0), torch.empty(0, device=dev))

    def sample() -> None:
        gen_model.sample(0, n, torch.Generator().manual_seed(1))

    @torch.no_grad()
    def bare() -> None:
        for _ in range(sampling["steps"]):
            net(z, t, y)
        ae.decode(z[:n])

    sample()  # warm-up
    t_sample, t_bare = [], []
    for _ in range(repeats):  # interleaved
        t_sample.append(best(sample, 1))
        t_bare.append(best(bare, 1))
    store = toy_store(tmp / "store.zarr", size, SMOKE["store_patches"] if smoke else 256)
    gcfg = {**GENERATOR, "preset": preset, "patch_size": patch, "batch": batch, "lr": 2e-4,
            "weight_decay": 0.03, "betas": [0.99, 0.99], "warmup": 10, "ema": 0.9999,
            "label_dropout": 0.15}

    def train_seconds(steps: int) -> float:
        """Seconds the training loop of ``train_generator`` spent on ``steps`` steps."""
        train_generator(store, paths["autoencoder"], tmp / "g.pt", cfg={**gcfg, "steps": steps},
                        mode="cond", seed=0, checkpoint_every=GENERATE["checkpoint_every"],
                        cache_mb=GENERATE["cache_mb"], progress=False)
        return float(load_state(tmp / "g.pt")["seconds"])

    steps = SMOKE["train_steps"] if smoke else 4
    mem = peak(lambda: (sample(), train_seconds(2)))
    step_s = min((train_seconds(1 + steps) - train_seconds(1)) / steps
                 for _ in range(max(1, repeats // 2)))
    return {f"train_step_s_{preset}": step_s,
            f"sample_images_per_s_{preset}": n / min(t_sample),
            f"peak_mem_mb_{preset}": mem,
            f"sampling_vs_forward_{preset}": min(t_sample) / min(t_bare)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="default results/bench/generate.txt (smoke: results/bench/smoke/generate.txt)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds: check the bench runs")
    args = parser.parse_args()
    if args.smoke:
        args.presets, args.repeats = "tiny", 1
        torch.set_num_threads(1)
    out = args.out or ROOT / "results/bench" / ("smoke/generate.txt" if args.smoke else "generate.txt")
    presets = args.presets.split(",")
    figures: dict[str, float] = {}
    for preset in presets:
        with tempfile.TemporaryDirectory() as tmp:
            figures.update(bench(preset, args.repeats, Path(tmp), args.smoke))
        print(f"# {preset}: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()
                                         if k.endswith(preset)), flush=True)
    main_preset = presets[-1]
    print(f"# device: {device()}")
    lines = [f"{k}: {v:.4g}" for k, v in figures.items()]
    lines += [f"{name}: {figures[f'{name}_{main_preset}']:.4g}"
              for name in ("train_step_s", "sample_images_per_s", "peak_mem_mb",
                           "sampling_vs_forward")]
    save_figures(lines, out)


if __name__ == "__main__":
    main()
