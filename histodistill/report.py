"""The Snakemake report: artefacts of each result file (rule report_result: the evaluation's
training curves and its result table; the privacy audit's closest pairs; a shareable package's
datasheet) and `report.html` on any state of the results.

Usage: python -m histodistill.report [report.html]   (`make report`, from the repo root)
"""

from __future__ import annotations

import argparse
import html
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from histodistill import config
from histodistill.io import InputError, atomic_path, read_json
from histodistill.tables import result_files, rows, slide_rows


def plot_curves(result: dict, out: str | os.PathLike) -> None:
    """Training loss and accuracy per epoch of every evaluated architecture (mean over runs)."""
    fig = Figure(figsize=(9, 3.5))
    loss_ax, acc_ax = fig.subplots(1, 2)
    for arch, summary in result["patch"].items():
        epochs = range(1, len(summary["curve"]["loss"]) + 1)
        loss_ax.plot(epochs, summary["curve"]["loss"], label=arch)
        acc_ax.plot(epochs, summary["curve"]["acc"], label=arch)
    loss_ax.set(xlabel="epoch", ylabel="training loss", yscale="log")
    acc_ax.set(xlabel="epoch", ylabel="training accuracy", ylim=(0, 1))
    acc_ax.legend()
    fig.suptitle(f"{result['dataset']}: {result['method']}, ipc {result['ipc']}")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _html_table(head: list[str], body: list[list[str]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    lines = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table border='1' cellpadding='4'><tr>{cells}</tr>{lines}</table>"


def table_html(result: dict, out: str | os.PathLike) -> None:
    """The result's row of the results table (histodistill.tables) as a small HTML page, and
    its slide-level table when it has a ``slide`` section."""
    tables = [_html_table(*rows([result]))]
    if "slide" in result:
        tables.append("<h4>Slide level (MIL)</h4>" + _html_table(*slide_rows([result])))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>"
            f"{''.join(tables)}</body></html>\n")
    with atomic_path(out) as tmp:
        Path(tmp).write_text(page)


def report_result(result_path: str | os.PathLike, curves: str | os.PathLike,
                  table: str | os.PathLike) -> None:
    """Write the curves PNG and the table HTML of one result JSON; a result written before
    curves were recorded is refused with a message saying how to refresh it."""
    result = read_json(result_path, "report")
    if any("curve" not in summary for summary in result["patch"].values()):
        raise InputError("report", result_path, "has no training curves (written before they were "
                         "recorded): rerun it with `snakemake -R evaluate <this file>`")
    plot_curves(result, curves)
    table_html(result, table)


def report_targets(workdir: str | os.PathLike) -> list[str]:
    """The report artefacts of every finished result file and shareable package (its rendered
    datasheet) under ``workdir``/results."""
    root = Path(workdir)
    curves = [f"results/{p.parent.name}/report/{p.stem}_curves.png"
              for d in root.glob("results/*/") for p in result_files(d)]
    sheets = [f"results/{p.parent.name}/report/{p.name.removesuffix('.share')}_datasheet.html"
              for p in root.glob("results/*/*_ipc*.share")]
    return sorted(curves + sheets)


def generator_targets(workdir: str | os.PathLike) -> list[str]:
    """The finished generator quality files under ``workdir``/results (their sample grids are
    marked for the report)."""
    return sorted(f"results/{p.parent.parent.name}/generate/{p.name}"
                  for p in Path(workdir).glob("results/*/generate/*_quality.json"))


def build_report(out: str | os.PathLike = "report.html", workdir: str | os.PathLike = ".",
                 snakemake_args: Sequence[str] = ()) -> None:
    """Write ``out`` with `snakemake --report` for what has been built so far.

    `snakemake --report` fails on any output marked for the report that does not exist, so it
    is asked only for the finished result files (after making their curves and tables, running
    no other rule) and the finished generator quality files (their sample grids); with none, for
    the first rule of the demo (`demo_cohort`, nothing marked for the report), which gives the
    workflow description alone. ``snakemake_args`` are passed to
    both calls (e.g. --directory, --configfile).
    """
    targets = report_targets(workdir)
    snakemake = [sys.executable, "-m", "snakemake", *(targets or ["demo_cohort"])]  # targets
    if targets:                                              # first: options take many values
        subprocess.run([*snakemake, "--cores", "1", "--allowed-rules", "report_result",
                        *snakemake_args], check=True)
    generated = generator_targets(workdir)
    if generated:
        snakemake = [sys.executable, "-m", "snakemake", *targets, *generated]
    subprocess.run([*snakemake, "--report", str(out), *snakemake_args], check=True)


def overlay_args(workdir: str | os.PathLike = ".") -> list[str]:
    """``--configfile`` with the overlays (configs/<dataset>.yaml) of the datasets that have
    results under ``workdir``, so that Snakemake knows their settings (none: no arguments)."""
    names = sorted(p.name for p in Path(workdir).glob("results/*/") if p.is_dir())
    files = [os.path.relpath(p) for p in config.overlays(*names)]
    return ["--configfile", *files] if files else []


def main(argv: list[str] | None = None) -> None:
    """``histodistill report [OUT]``: report.html of what has been built so far."""
    parser = argparse.ArgumentParser(prog="histodistill report",
                                     description="report.html of what has been built so far")
    parser.add_argument("out", nargs="?", default="report.html")
    try:
        build_report(parser.parse_args(argv).out, snakemake_args=overlay_args())
    except subprocess.CalledProcessError as err:  # snakemake has printed why
        sys.exit(err.returncode)


if __name__ == "__main__":
    main()
