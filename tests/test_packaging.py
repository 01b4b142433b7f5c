"""Packaging: the project declares its runtime dependencies (compatible ranges that the pinned
versions of requirements.txt satisfy) and a ``histodistill`` command; licence files ship."""

from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement

from conftest import ROOT
from histodistill import cli
from histodistill.io import write_json
from histodistill.summary import summarise


def declared() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *(r for group in project["optional-dependencies"].values()
                                       for r in group)]
    return {Requirement(r).name.lower(): Requirement(r) for r in reqs}


def test_every_pin_is_declared_and_inside_its_range():
    ranges = declared()
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\S+)$",
                      (ROOT / "requirements.txt").read_text(), re.M)
    assert len(pins) >= 20
    for name, version in pins:
        assert name.lower() in ranges, f"{name} is pinned but not declared in pyproject.toml"
        assert ranges[name.lower()].specifier.contains(version), (name, version)


def test_licence_files_and_version_agree():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert all((ROOT / f).is_file() for f in project["license-files"])
    citation = (ROOT / "CITATION.cff").read_text()
    assert f'version: "{project["version"]}"' in citation or f"version: {project['version']}" in citation
    assert f"## [{project['version']}]" in (ROOT / "CHANGELOG.md").read_text()


def test_the_command_lists_its_tools_and_runs_one(tmp_path, capsys):
    with pytest.raises(SystemExit, match="(?s)commands:.*report.*tables.*summary.*budget"):
        cli.main(["nope"])
    cli.main(["summary", str(tmp_path)])
    assert capsys.readouterr().out.strip()


def test_summary_lists_patch_level_results_until_the_result_file_joins_them(tmp_path):
    """After `make demo` (patch level only) the summary shows each set's patch-level accuracy;
    once `make demo-full` has written the set's result file, that file is shown instead."""
    patch = {"patch": {"convnet": {"acc": {"mean": 0.6, "std": 0.01}}}}
    (tmp_path / "patch_eval").mkdir()
    write_json(tmp_path / "patch_eval" / "dm_ipc10.json", patch)
    write_json(tmp_path / "patch_eval" / "random_ipc10.json", patch)
    write_json(tmp_path / "random_ipc10.json", {"patch": {"convnet": {"acc": {"mean": 0.5, "std": 0.02}}}})
    lines = summarise(tmp_path).splitlines()
    assert any("patch_eval/dm_ipc10.json" in ln and "acc 60.0 ± 1.0%" in ln for ln in lines)
    assert any(ln.split()[1] == str(tmp_path / "random_ipc10.json") and "acc 50.0 ± 2.0%" in ln
               for ln in lines)
    assert not any("patch_eval/random_ipc10.json" in ln for ln in lines)


def test_a_copy_installed_without_its_repository_says_how_to_install(tmp_path, monkeypatch):
    """`pip install .` copies the package without the workflow and schema beside it."""
    from histodistill import config

    missing = tmp_path / "workflow" / "schemas" / "config.schema.yaml"
    monkeypatch.setattr(config, "SCHEMA", missing)
    with pytest.raises(config.ConfigError, match=r"not found.*pip install -e \."):
        config.load_schema(missing)
