"""The allocator trimmer every rule starts: freed heap memory goes back to the system."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    from histodistill.memory import start_trimmer

    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    started = start_trimmer(0.05) if sys.argv[1] == "trim" else None
    keep = []
    for step in range(40):  # a training loop's pattern: blocks of a few MiB, freed every step
        blocks = [np.ones(3 * 2**20 // 8 + step) for _ in range(20)]  # 20 x ~3 MiB, touched
        keep.append(np.ones(64))  # small long-lived objects between them (fragmentation)
        del blocks
    time.sleep(0.5)  # several trimmer periods
    print(started, rss_mb())
""")


def _run(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], float(out[1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_trimmer_returns_freed_heap_to_the_system():
    started, trimmed = _run("trim")
    assert started == "True"
    _, default = _run("default")
    # glibc's default keeps the freed ~60 MiB per step in the heap once its mmap threshold has
    # grown past the block size; the trimmer hands it back
    assert trimmed < default - 30, (trimmed, default)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_trimmer_starts_once_per_process():
    import threading

    from histodistill.memory import start_trimmer

    assert start_trimmer() and start_trimmer()
    assert [t.name for t in threading.enumerate()].count("malloc_trim") == 1
