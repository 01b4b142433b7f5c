"""Packaging: the project declares its runtime dependencies (compatible ranges that the pinned
versions of requirements.txt satisfy) and a ``histodistill`` command; licence files ship."""

from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement

from conftest import ROOT
from histodistill import cli


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
