"""The report: curves and tables of result files, and `report.html` on any state of the results."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import snakemake
from histodistill.io import InputError
from histodistill.report import build_report, report_result, report_targets

pytestmark = pytest.mark.slow  # outside the fast tier (make test-all)

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests/slurm/tiny.yaml"  # the demo shrunk to seconds per stage


def smk_args(work: Path) -> list[str]:
    """The snakemake options of a fresh working directory on the tiny demo."""
    return ["--snakefile", str(ROOT / "Snakefile"), "--directory", str(work),
            "--configfile", str(ROOT / "config.yaml"), str(ROOT / "configs/demo.yaml"), str(TINY)]


def built_args(work: Path) -> list[str]:
    """The snakemake options of the shared tiny workflow (conftest's ``built``)."""
    return ["--snakefile", str(ROOT / "Snakefile"), "--directory", str(work),
            "--configfile", str(work / "config.yaml")]


@pytest.fixture(scope="module")
def finished(built: Path) -> Path:
    """The shared tiny demo run with one more finished result file (dm, ipc 2)."""
    snakemake(built, "results/demo/dm_ipc2.json", "--cores", "2")
    return built


def embedded(report: Path) -> str:
    return report.read_text(errors="replace")


def test_result_curves_and_table(finished, tmp_path):
    result = json.loads((finished / "results/demo/dm_ipc2.json").read_text())
    curve = result["patch"]["convnet"]["curve"]
    assert len(curve["loss"]) == len(curve["acc"]) == 3  # test_workflow's TINY_EVALUATE
    assert all(0 <= a <= 1 for a in curve["acc"]) and all(v > 0 for v in curve["loss"])
    report_result(finished / "results/demo/dm_ipc2.json", tmp_path / "c.png", tmp_path / "t.html")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "t.html").read_text()
    acc = result["patch"]["convnet"]["acc"]
    assert (f"<td>dm</td><td>2</td><td>off</td><td>{100 * acc['mean']:.1f} ± "
            f"{100 * acc['std']:.1f}</td>") in page
    assert "<td>full data</td>" in page and "<th>convnet acc %</th>" in page


def test_result_without_curves_is_refused_and_writes_nothing(finished, tmp_path):
    result = json.loads((finished / "results/demo/dm_ipc2.json").read_text())
    del result["patch"]["convnet"]["curve"]
    old = tmp_path / "dm_ipc2.json"
    old.write_text(json.dumps(result))
    with pytest.raises(InputError, match=r"\[report\] .*dm_ipc2.json: has no training curves"):
        report_result(old, tmp_path / "c.png", tmp_path / "t.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dm_ipc2.json"]


def test_report_of_a_finished_run_has_grid_table_and_curves(finished):
    results = sorted(p.stem for p in (finished / "results/demo").glob("*_ipc*.json"))
    assert "dm_ipc2" in results
    assert report_targets(finished) == [f"results/demo/report/{r}_curves.png" for r in results]
    build_report(finished / "report.html", finished, built_args(finished))
    text = embedded(finished / "report.html")
    for name in ("distilled/dm_ipc2.png", "report/dm_ipc2_curves.png", "report/dm_ipc2_table.html",
                 "stain/template.png"):
        assert name in text, name
    for category in ("Distilled sets", "Evaluation", "Stain template"):
        assert category in text, category
    assert "histodistill distils a histopathology cohort" in text  # workflow.rst
    assert "privacy/dm_ipc2_pairs.png" in text and "Privacy" in text  # the closest pairs


def test_report_shows_the_datasheet_of_a_package(finished, tmp_path):
    optin = tmp_path / "optin.yaml"  # the tiny DM may stay close to its real start: opt in
    optin.write_text("privacy: {package: {allow_memorised: true, licence: CC-BY-4.0}}\n")
    args = [*built_args(finished), str(optin)]
    snakemake(finished, "results/demo/dm_ipc2.share", "--cores", "1",
              "--configfile", str(finished / "config.yaml"), str(optin))
    assert "results/demo/report/dm_ipc2_datasheet.html" in report_targets(finished)
    build_report(finished / "report.html", finished, args)
    text = embedded(finished / "report.html")
    assert "report/dm_ipc2_datasheet.html" in text and "Shareable packages" in text


def test_report_builds_on_a_fresh_state(tmp_path):
    build_report(tmp_path / "report.html", tmp_path, smk_args(tmp_path))
    text = embedded(tmp_path / "report.html")
    assert "histodistill distils a histopathology cohort" in text
    assert not (tmp_path / "results").exists()  # nothing was built to make it


def test_report_of_a_target_half_built_shows_what_exists_and_what_does_not(built, tmp_path):
    """The tiny demo stopped half-way (its evaluation, privacy audit and result file not built):
    the report of the target holds the built stages' items, the state page names the rest."""
    work = tmp_path / "half"
    shutil.copytree(built, work, symlinks=True)
    target = "results/demo/dm_ipc10.json"
    for gone in (target, "results/demo/patch_eval/dm_ipc10.json", "results/demo/privacy"):
        path = work / gone
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    build_report(work / "report.html", work, built_args(work), targets=[target])
    text = embedded(work / "report.html")
    for name in ("distilled/dm_ipc10.png", "stain/template.png"):
        assert name in text, name
    assert "dm_ipc10_pairs.png" not in text
    state = (work / "report_state.html").read_text()
    assert "<td>distill</td><td>3</td><td>0</td>" in state
    assert "<td>evaluate</td><td>0</td><td>1</td>" in state
    assert "results/demo/privacy/dm_ipc10_pairs.png" in state  # named as not built yet
    assert not (work / target).exists()  # the report builds nothing of the target
