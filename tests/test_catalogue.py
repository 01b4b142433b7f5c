"""The method catalogue is the one list of methods: registries, schema, rule files, tables and
the share package's guard agree with it, and a new method is one module and one row."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from histodistill import catalogue, config, tables
from histodistill.privacy.package import is_coreset

ROOT = Path(__file__).resolve().parent.parent


def test_registries_schema_and_tables_follow_the_catalogue():
    from histodistill.distill import METHODS
    from histodistill.select.base import SELECTORS
    from histodistill.select.run import select  # noqa: F401  (registers the selectors)

    assert sorted(METHODS) == sorted(catalogue.names("distill"))
    schema = config.load_schema()
    assert schema["$defs"]["method"]["enum"] == catalogue.names()
    assert schema["$defs"]["selection_method"]["enum"] == catalogue.names("select")
    shipped = config.load(config.CONFIG)["select"]["methods"]  # the schema's defaults
    assert sorted(shipped) == sorted(catalogue.names("select"))
    assert {m["selector"] for m in shipped.values()} <= set(SELECTORS)
    assert tables.ORDER == catalogue.names()


def test_rows_are_checked_and_unknown_names_are_named():
    with pytest.raises(ValueError, match="inputs"):
        catalogue.Method("x", "distill", "m", "f", "r", inputs=("weights",))
    with pytest.raises(ValueError, match="stage"):
        catalogue.Method("x", "train", "m", "f", "r")
    with pytest.raises(KeyError, match="'nope'.*histodd"):
        catalogue.get("nope")


def test_real_patch_methods_are_the_coresets_and_the_real_selection():
    assert [m for m in catalogue.names() if is_coreset(m)] == [
        "herding", "forgetting", "random", "infodist_real"]


def test_per_slide_refusal_gives_the_rows_reason():
    with pytest.raises(config.ConfigError, match="nothing is ever forgotten.*'histodd'"):
        config.check_per_slide("forgetting")
    config.check_per_slide("dm")  # can


TOY = '''"""A toy method for the catalogue test: random real patches under another name."""
from histodistill.distill.base import register
from histodistill.distill.coreset import RandomCoreset


@register("toy")
class Toy(RandomCoreset):
    """Random real patches."""
'''
ROW = ('    Method("toy", "distill", "histodistill.distill.toy", "coreset", "a test", '
       'real_patches=True),\n)\nBY_NAME')


@pytest.mark.slow
def test_a_new_method_is_one_module_and_one_row(tmp_path):
    for name in ("Snakefile", "workflow", "scripts", "histodistill", "envs"):
        copy_ = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy_(ROOT / name, tmp_path / name)
    (tmp_path / "profiles").symlink_to("workflow/profiles")
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    (tmp_path / "histodistill/distill/toy.py").write_text(TOY)
    cat = tmp_path / "histodistill/catalogue.py"
    cat.write_text(cat.read_text().replace(")\nBY_NAME", ROW, 1))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    registered = subprocess.run(
        [sys.executable, "-c", "from histodistill.distill import METHODS; print(sorted(METHODS))"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert "'toy'" in registered
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "results/demo/toy_ipc2.json",
         "--configfile", "configs/demo.yaml",
         "--config", "datasets={demo: {distill: {methods: {toy: {}}}}}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "results/demo/distilled/toy_ipc2.zarr" in proc.stdout
    assert "results/demo/toy_ipc2.json" in proc.stdout
