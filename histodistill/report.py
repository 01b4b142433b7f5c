"""The Snakemake report: artefacts of each result file (rule report_result: the evaluation's
training curves and its result table; the privacy audit's closest pairs; a shareable package's
datasheet) and `report.html` on any state of the results.

Usage: python -m histodistill.report [report.html]   (`make report`, from the repo root)
"""

from __future__ import annotations

import argparse
import html
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def curves_path(result: str) -> str:
    """The training-curves item of a result file ``results/<dataset>/<name>.json``."""
    path = Path(result)
    return f"{path.parent}/report/{path.stem}_curves.png"


def report_targets(workdir: str | os.PathLike) -> list[str]:
    """The report artefacts of every finished result file and shareable package (its rendered
    datasheet) under ``workdir``/results."""
    root = Path(workdir)
    curves = [curves_path(f"results/{p.parent.name}/{p.name}")
              for d in root.glob("results/*/") for p in result_files(d)]
    sheets = [f"results/{p.parent.name}/report/{p.name.removesuffix('.share')}_datasheet.html"
              for p in root.glob("results/*/*_ipc*.share")]
    return sorted(curves + sheets)


def generator_targets(workdir: str | os.PathLike) -> list[str]:
    """The finished generator quality files under ``workdir``/results (their sample grids are
    marked for the report)."""
    return sorted(f"results/{p.parent.parent.name}/generate/{p.name}"
                  for p in Path(workdir).glob("results/*/generate/*_quality.json"))


RULES = Path(__file__).resolve().parent.parent / "workflow" / "rules"


def report_rules(rules: Path = RULES) -> set[str]:
    """The rules with an output marked for the report (``report(...)`` in their block)."""
    marked = set()
    for smk in rules.glob("*.smk"):
        for name, body in re.findall(r"^(?:rule|checkpoint) (\w+):\n((?:[ \t]+.*\n|\n)*)",
                                     smk.read_text(), re.M):
            if "report(" in body:
                marked.add(name)
    return marked


def target_state(targets: Sequence[str], workdir: str | os.PathLike,
                 snakemake_args: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every output of the targets' DAG with its rule and whether it exists (`snakemake
    --summary`: nothing is run or written)."""
    proc = subprocess.run([sys.executable, "-m", "snakemake", *targets, "--summary",
                           *snakemake_args], capture_output=True, text=True, check=True)
    lines = proc.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("output_file\t"))
    state = []
    for line in lines[head + 1:]:
        cells = line.split("\t")
        if len(cells) >= 5:
            state.append({"file": cells[0], "rule": cells[2],
                          "built": cells[4] != "missing" and (Path(workdir) / cells[0]).exists()})
    return state


def state_page(targets: Sequence[str], rows: list[dict[str, Any]], marked: set[str],
               out: str | os.PathLike) -> None:
    """``out``: the targets' rules in DAG order with their built and missing outputs, and the
    report items not built yet (left out of the report)."""
    rules: dict[str, list[int]] = {}
    for row in rows:
        counts = rules.setdefault(row["rule"], [0, 0])
        counts[0 if row["built"] else 1] += 1
    pending = [r["file"] for r in rows if r["rule"] in marked and not r["built"]]
    body = _html_table(["rule", "outputs built", "outputs not built"],
                       [[rule, str(done), str(todo)] for rule, (done, todo) in rules.items()])
    note = ("<p>Report items not built yet (left out of the report):</p><ul>"
            + "".join(f"<li>{html.escape(f)}</li>" for f in pending) + "</ul>") if pending else ""
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>state</title></head><body>"
            f"<h3>State of {html.escape(' '.join(targets))}</h3>{body}{note}</body></html>\n")
    with atomic_path(out) as tmp:
        Path(tmp).write_text(page)


def build_report(out: str | os.PathLike = "report.html", workdir: str | os.PathLike = ".",
                 snakemake_args: Sequence[str] = (), targets: Sequence[str] = ()) -> None:
    """Write ``out`` with `snakemake --report` for what has been built so far.

    `snakemake --report` fails on any output marked for the report that does not exist, so it
    is asked only for the finished result files (after making their curves and tables, running
    no other rule) and the finished generator quality files (their sample grids); with none, for
    the first rule of the demo (`demo_cohort`, nothing marked for the report), which gives the
    workflow description alone. ``snakemake_args`` are passed to
    both calls (e.g. --directory, --configfile).
    """
    if targets:
        _report_of_targets(out, workdir, snakemake_args, targets)
        return
    targets = report_targets(workdir)
    snakemake = [sys.executable, "-m", "snakemake", *(targets or ["demo_cohort"])]  # targets
    if targets:                                              # first: options take many values
        subprocess.run([*snakemake, "--cores", "1", "--allowed-rules", "report_result",
                        *snakemake_args], check=True)
    generated = generator_targets(workdir)
    if generated:
        snakemake = [sys.executable, "-m", "snakemake", *targets, *generated]
    subprocess.run([*snakemake, "--report", str(out), *snakemake_args], check=True)


def _report_of_targets(out: str | os.PathLike, workdir: str | os.PathLike,
                       snakemake_args: Sequence[str], targets: Sequence[str]) -> None:
    """The report of ``targets`` on any state: every report item of their DAG that exists
    (the finished result files' curves and tables made first), and ``<out>`` 's state page
    (``<stem>_state.html``: the targets' rules with what is built and what is not)."""
    rows = target_state(targets, workdir, snakemake_args)
    marked = report_rules()
    items = [r["file"] for r in rows if r["rule"] in marked and r["built"]]
    curves = [curves_path(r["file"]) for r in rows if r["rule"] == "result" and r["built"]]
    smk = [sys.executable, "-m", "snakemake"]
    if curves:
        subprocess.run([*smk, *curves, "--cores", "1", "--allowed-rules", "report_result",
                        *snakemake_args], check=True)
    # with no item built, a target of a job without report items gives the description alone
    plain = [r["file"] for r in rows if r["rule"] not in marked][-1:]
    subprocess.run([*smk, *(items + curves or plain), "--report", str(out), *snakemake_args],
                   check=True)
    state_page(targets, rows, marked, Path(out).with_name(f"{Path(out).stem}_state.html"))


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
    parser.add_argument("--target", nargs="+", default=[],
                        help="report these targets on any state (what is built, what is not)")
    parser.add_argument("--configfile", nargs="+", default=[],
                        help="config files of the targets (default: the overlays of the datasets "
                             "with results)")
    args = parser.parse_args(argv)
    config_args = ["--configfile", *args.configfile] if args.configfile else overlay_args()
    try:
        build_report(args.out, snakemake_args=config_args, targets=args.target)
    except subprocess.CalledProcessError as err:  # snakemake has printed why
        sys.exit(err.returncode)


if __name__ == "__main__":
    main()
