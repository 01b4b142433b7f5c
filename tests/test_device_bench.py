"""The device check (bench/device.sh) in its CPU smoke mode: it runs, within its limit, and ends
with the `name: value` lines of every measurement (the GPU run itself needs a lent GPU)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = [r"stream_patches_per_s_\d+px", r"stream_to_device_patches_per_s_\d+px",
            r"sampler_patches_per_s_\d+px", r"evaluate_epoch_s_\d+px", r"dm_iteration_s_\d+px",
            r"mtt_iteration_s_\d+px", r"histodd_outer_loop_s_\d+px",
            r"histodd_outer_loop_vs_paper_v100_\d+px", r"histodd_outer_loop_vs_paper_v100",
            r"histodd_measured_inner_\d+px", r"uvit_tiny_train_steps_per_s", r"smoke"]


def test_device_sh_cpu_smoke(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable}
    gpu_figures = ROOT / "results/bench/device.txt"
    before = gpu_figures.stat().st_mtime_ns if gpu_figures.exists() else None
    proc = subprocess.run(["bash", str(ROOT / "bench/device.sh"), "--cpu", "--limit", "240"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = dict(re.findall(r"^(\w+): (\S+)$", proc.stdout, re.M))
    for name in EXPECTED:
        found = [k for k in figures if re.fullmatch(name, k)]
        assert found, f"no line {name!r} in:\n{proc.stdout}"
        for key in found:
            value = float(figures[key])  # numeric
            assert value >= 0 and value == value, f"{key}: {figures[key]}"
    assert figures["smoke"] == "1"
    assert figures["histodd_measured_inner_32px"] == "2"  # extrapolated to U = 100, and says so
    # a smoke run keeps its figures apart: it never overwrites the GPU run's
    assert (ROOT / "results/bench/smoke/device.txt").exists()
    assert (gpu_figures.stat().st_mtime_ns if gpu_figures.exists() else None) == before
