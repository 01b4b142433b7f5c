"""Benches that keep working: every bench script (``bench/*.py``, found by glob, so a new one is
covered without being listed here) has a ``--smoke`` mode (tiny sizes, seconds, its own inputs,
figures kept out of results/bench/) that runs here and ends with its figures, ``name: value``
lines, so an API change that breaks a bench fails the tests; and benches use the library's
public names, never its private ones (``_name``)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

BENCHES = sorted(p for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))
FIGURE = re.compile(r"^[A-Za-z_][\w.\-]*: (\S+)$")
TAIL = 3  # the last lines of every bench's output: figures with numeric values


def test_benches_are_found():
    assert len(BENCHES) >= 8, BENCHES


@pytest.mark.parametrize("script", BENCHES, ids=lambda p: p.stem)
def test_bench_has_a_smoke_mode(script: Path):
    assert '"--smoke"' in script.read_text(), f"{script.name} has no --smoke option"


def private_uses(source: str) -> list[str]:
    """Private names of histodistill a script uses: ``from histodistill... import _name`` and
    ``<name imported from histodistill>._name``."""
    tree = ast.parse(source)
    library, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "histodistill":
            for alias in node.names:
                library.add(alias.asname or alias.name)
                if alias.name.startswith("_"):
                    found.append(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "histodistill":
                    library.add(alias.asname or alias.name.split(".")[0])
                    found += [alias.name for part in alias.name.split(".") if part.startswith("_")]
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
                and node.value.id in library):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_private_uses_are_found():
    source = ("from histodistill.mil.bags import _Writer, read_bag\nfrom histodistill import io\n"
              "import histodistill.data._x\nio._json_default(1)\nread_bag._y\nother._z\n")
    assert sorted(private_uses(source)) == ["histodistill.data._x", "histodistill.mil.bags._Writer",
                                            "io._json_default", "read_bag._y"]


@pytest.mark.parametrize("script", BENCHES, ids=lambda p: p.stem)
def test_bench_uses_public_names(script: Path):
    assert private_uses(script.read_text()) == []


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def figure_files() -> dict[Path, int]:
    """The real figure files (results/bench/*.txt) and their modification times."""
    return {p: p.stat().st_mtime_ns for p in (ROOT / "results" / "bench").glob("*.txt")}


@pytest.mark.slow
@pytest.mark.parametrize("script", BENCHES, ids=lambda p: p.stem)
def test_bench_smoke(script: Path):
    before = figure_files()
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, str(script), "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": path})
    assert proc.returncode == 0, f"{script.name} --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) >= TAIL, proc.stdout
    for line in lines[-TAIL:]:
        match = FIGURE.match(line)
        assert match and is_number(match.group(1)), f"{script.name}: not a `name: number` line: {line!r}"
    assert figure_files() == before, "a smoke run wrote the real figures under results/bench/"
