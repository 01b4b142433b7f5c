"""Results tables generated from result JSON files (the docs' tables come from here).

Usage: python -m histodistill.tables results/<dataset> [--readme docs] [--bench results/bench]
       python -m histodistill.tables --augment results/<dataset>/augment_<method>.json
With ``--readme PATH`` (a Markdown file, or a folder whose ``*.md`` files are searched; repeat it
for several) the table replaces the text between ``<!-- results:<dataset>:start -->`` and
``<!-- results:<dataset>:end -->`` (and, for results with those sections, the privacy audits'
table the block ``<!-- privacy:<dataset> -->``, the slide-level table the block
``<!-- slide:<dataset> -->``, transfer results ``<!-- transfer:<dataset> -->``, the generators'
quality ``<!-- generate:<dataset> -->`` and each
augmentation study's table the block ``<!-- augment_<method>:<dataset> -->``), in whichever
file holds each block; one of them must hold the results block. With ``--bench results/bench``
each ``<!-- bench:<name> -->`` block gets the figures of ``results/bench/<name>.txt``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from histodistill import catalogue
from histodistill.io import atomic_path, read_json

SATURATED_LIMIT = 0.02  # a set with more saturated pixels is flagged "(!)": clipped noise, not tissue
ORDER = catalogue.names()  # rows in the catalogue's order


def _pct(metric: dict) -> str:
    return f"{100 * metric['mean']:.1f} ± {100 * metric['std']:.1f}"


def _order(result: dict) -> tuple[int, int]:
    """Sort key of result files: ipc, then the methods in :data:`ORDER`."""
    return result["ipc"], ORDER.index(result["method"]) if result["method"] in ORDER else 99
def result_files(folder: str | Path) -> list[Path]:
    """The result files (``<method>_ipc<N>.json``) in ``folder``, without transfer results."""
    return [p for p in sorted(Path(folder).glob("*_ipc*.json")) if not p.name.startswith("transfer_")]


def _view(result: dict, protocol: str) -> dict | None:
    """The figures of ``result`` under its method's own stain protocol ("own") or the other one
    ("other": recorded when evaluate.both_protocols is on; None when it was not)."""
    if protocol == "own":
        return result
    other = result.get("other_protocol")
    return None if other is None else {**result, **other}


def _privacy_cells(result: dict) -> list[str]:
    """Memorised share (pixel / feature space) and the membership attack's AUC against the
    set's sources, from the result's privacy audit ("-" when it has none)."""
    p = result.get("privacy")
    if p is None:
        return ["-", "-"]
    memorised = " / ".join(f"{100 * p['spaces'][s]['memorised']:.0f}"
                           for s in ("pixel", "feature") if s in p["spaces"])
    attack = p["spaces"][p["attack_space"]]["attack"].get("sources")
    return [memorised, f"{attack['auc']:.2f}" if attack else "-"]


def rows(results: list[dict], protocol: str = "own") -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per method and ipc (sorted), one column group per architecture,
    the privacy audit beside the accuracy, the distillation budget, and a last "full data" row
    with the upper bound. ``protocol`` "other" prints the other stain protocol's figures."""
    results = sorted(results, key=_order)
    archs = [a for a in results[0]["patch"] if all(a in r["patch"] and a in r["full"] for r in results)]
    cross = any("cross_arch" in r for r in results)
    head = ["method", "ipc", "stain norm"] + [f"{a} {m}" for a in archs for m in ("acc %", "AUC %")]
    head += ["cross-arch acc %"] * cross
    head += ["memorised % pixel / feature", "MIA AUC sources", "saturated %", "distill s",
             "image updates", "selection s"]
    body = []
    for r in results:
        view = _view(r, protocol)
        cells = [r["method"], str(r["ipc"])]
        if view is None:
            body.append(cells + ["-"] * (len(head) - 2))
            continue
        cells.append("on" if view.get("stain_norm") else "off")
        for a in archs:
            cells += [_pct(view["patch"][a]["acc"]), _pct(view["patch"][a]["auc"])]
        if cross:
            cells.append(_pct(view["cross_arch"]["acc"]) if "cross_arch" in view else "-")
        cells += _privacy_cells(r)
        flag = " (!)" if r["saturated_fraction"] > SATURATED_LIMIT else ""
        cells.append(f"{100 * r['saturated_fraction']:.1f}{flag}")
        cells.append(f"{r['distill']['seconds']:.0f}")
        cells.append(str(r["distill"].get("image_updates", "-")))
        tuning = r["distill"].get("tuning")
        cells.append(f"{sum(c['seconds'] for c in tuning['candidates']):.0f}" if tuning else "-")
        body.append(cells)
    full = results[0]["full"]
    body.append(["full data", "all", "-"]
                + [c for a in archs for c in (_pct(full[a]["acc"]), _pct(full[a]["auc"]))]
                + ["-"] * cross + ["-"] * 6)
    return head, body


def table(folder: str | Path, protocol: str = "own") -> str:
    """Markdown table of every result file in ``folder`` (see ``rows``) with a note on how it
    was measured."""
    results = [read_json(p, "tables") for p in result_files(folder)]
    if not results:
        raise FileNotFoundError(f"no result files (*_ipc*.json) in {folder}")
    head, body = rows(results, protocol)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    archs = list(results[0]["patch"])
    runs = len(results[0]["patch"][archs[0]]["acc"]["runs"])
    budget = Path(folder) / "budget.json"
    lines.append("")
    lines.append(f"Mean ± std over {runs} seeded training runs on the distilled set, tested on the "
                 f"real test split; full data: one run on the whole training split, under "
                 f"`evaluate.stain_norm`. "
                 + ("Stain norm: each method under its paper's test-time protocol (on: every "
                    "input stain-normalised to the template). " if protocol == "own" else
                    "Stain norm: every method under the other protocol than its paper's. ")
                 + "Memorised: share of the set closer to a real training patch than the 5th "
                 "percentile of held-out patches; MIA AUC: membership attack on the set's source "
                 "patches (0.5: no leak). Saturated: share of "
                 "synthetic pixels at 0 or 255 in some channel, (!) above "
                 f"{100 * SATURATED_LIMIT:.0f} %. Distill s: the loop's seconds on "
                 "the machine that ran it; image updates: optimiser steps on the set; selection s: "
                 "the distillation seconds of every candidate of the method's grid, spent to "
                 "choose its setting on the validation split (the chosen candidate's set is the "
                 "row's). "
                 + (f"Budget: {read_json(budget, 'tables')['budget_s']:.0f} s of distillation "
                    "per method and set (iteration counts calibrated in budget.json). "
                    if budget.exists() else "")
                 + ("Cross-arch: mean over the architectures in `evaluate.cross_arch` other than "
                    "the one the set was distilled with. " if any("cross_arch" in r for r in results) else "")
                 + f"Generated by "
                 f"`python -m histodistill.tables {Path(folder).as_posix()}"
                 + (" --protocol other" if protocol == "other" else "")
                 + "` from the result JSON files.")
    return "\n".join(lines)


def seeds_table(folder: str | Path) -> str | None:
    """Markdown table of the seed summaries (``seeds/*.json``): per method and ipc, the mean and
    std over distillation seeds of each seed's mean accuracy; None when there are none."""
    files = sorted((Path(folder) / "seeds").glob("*_ipc*.json"))
    if not files:
        return None
    results = sorted((read_json(p, "tables") for p in files), key=_order)
    arch = next(iter(results[0]["patch"]))
    cross = any("cross_arch" in r for r in results)
    head = ["method", "ipc", "seeds", f"{arch} acc % (mean ± std over seeds)", "per seed"]
    head += ["cross-arch acc %"] * cross + ["distill s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        acc = r["patch"][arch]["acc"]
        cells = [r["method"], str(r["ipc"]), str(len(r["seeds"])), _pct(acc),
                 " / ".join(f"{100 * v:.1f}" for v in acc["seeds"])]
        if cross:
            cells.append(_pct(r["cross_arch"]["acc"]) if "cross_arch" in r else "-")
        cells.append(f"{r['distill']['seconds']['mean']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Each seed's figure is its set's mean over the training runs; mean ± std over "
                 "the distillation seeds (a paper's claim has to clear this std). Generated by "
                 f"`python -m histodistill.tables {Path(folder).as_posix()}` from seeds/*.json.")
    return "\n".join(lines)


def frontier(folder: str | Path, out: str | Path, space: str = "pixel") -> list[dict]:
    """The utility-privacy frontier: each audited set's test accuracy (first architecture, its
    own stain protocol) against the share of its images memorised in ``space``, one point per
    method and ipc, drawn to ``out`` (PNG); returns the points. A user picks a method for
    sharing with both in view: up is better, left is safer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = sorted((read_json(p, "tables") for p in result_files(folder)), key=_order)
    points = [{"method": r["method"], "ipc": r["ipc"],
               "memorised": r["privacy"]["spaces"][space]["memorised"],
               "acc": next(iter(r["patch"].values()))["acc"]["mean"],
               "std": next(iter(r["patch"].values()))["acc"]["std"]}
              for r in results if "privacy" in r and space in r["privacy"]["spaces"]]
    if not points:
        raise FileNotFoundError(f"no audited result files in {folder}")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for pt in points:
        ax.errorbar(100 * pt["memorised"], 100 * pt["acc"], yerr=100 * pt["std"], fmt="o",
                    capsize=3)
        ax.annotate(f"{pt['method']} ipc{pt['ipc']}", (100 * pt["memorised"], 100 * pt["acc"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
    full = next(iter(results[0]["full"].values()), None)
    if full is not None:
        ax.axhline(100 * full["acc"]["mean"], ls="--", lw=1, color="grey", label="full data")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel(f"memorised images, {space} space (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xlim(-5, 105)
    ax.set_title(f"{Path(folder).name}: utility against memorisation", fontsize=10)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return points


def collect(results: str | Path, docs: str | Path) -> list[Path]:
    """Copy the small JSON files behind a dataset's tables (result files, seed summaries, tuning
    choices, the budget calibration) from ``results`` into ``docs``, where they are committed
    and the tables are generated from; returns the files written."""
    results, docs = Path(results), Path(docs)
    written = []
    patterns = ["*_ipc*.json", "seeds/*_ipc*.json", "budget.json", "augment_*.json",
                "generate/*_quality.json"]
    for pattern in patterns:
        for src in sorted(results.glob(pattern)):
            dst = docs / src.relative_to(results)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(src.read_text())
            written.append(dst)
    for src in sorted(results.glob("tuning/*_ipc*.json")):
        if re.search(r"_c\d+(_cost)?$", src.stem) is None:  # the choices, not the candidates
            dst = docs / src.relative_to(results)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(src.read_text())
            written.append(dst)
    return written


def _auc(attack: dict | None) -> str:
    if attack is None:
        return "-"
    return f"{attack['auc']:.2f} [{attack['ci'][0]:.2f}, {attack['ci'][1]:.2f}]"


def _spaces(spaces: dict, key: str) -> str:
    """One figure of every audited space, pixel first: "0.95 / 0.55"."""
    return " / ".join(f"{spaces[s][key]:.2f}" for s in ("pixel", "feature") if s in spaces)


def privacy_table(folder: str | Path) -> str | None:
    """Markdown table of the privacy audits (``privacy`` sections) of the result files in
    ``folder``, one row per method and ipc; None when no result has one."""
    results = [read_json(p, "tables") for p in result_files(folder)]
    results = sorted((r for r in results if "privacy" in r), key=_order)
    if not results:
        return None
    head = ["method", "ipc", "memorised pixel / feature", "NN distance ratio pixel / feature",
            "attack AUC, sources", "attack AUC, random members", "control", "audit s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        p = r["privacy"]
        attack = p["spaces"][p["attack_space"]]["attack"]
        cells = [r["method"], str(r["ipc"]), _spaces(p["spaces"], "memorised"),
                 _spaces(p["spaces"], "median_ratio"), _auc(attack.get("sources")),
                 _auc(attack["random"]), _auc(attack.get("null")), f"{p['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    p = results[0]["privacy"]
    lines.append("")
    lines.append(f"Memorised: share of the set's images closer to a real training patch than the "
                 f"{p['percentile']:g}th percentile of {p['n_heldout']} held-out "
                 f"({p['heldout_split']}) patches. Ratio: median nearest-training distance of the "
                 f"set over that of the held-out patches. Attack AUC ({p['attack_space']} space, "
                 f"95 % bootstrap interval): training vs held-out patches scored by their distance "
                 f"to the nearest image of the set; sources: the patches the set was made from; "
                 f"control: random members against {p.get('n_null', '?')} unseen real patches "
                 f"({', '.join(p.get('null_splits', []))}) in place of the set, what the attack "
                 f"reads when nothing leaks. "
                 f"Generated by `python -m histodistill.tables {Path(folder).as_posix()}` from the "
                 f"result JSON files.")
    return "\n".join(lines)
def slide_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the slide level: per result with a ``slide`` section and per MIL
    model, accuracy and AUC on synthetic and on full bags, seconds per epoch and bag storage."""
    head = ["method", "ipc", "model", "synthetic acc %", "full acc %", "synthetic AUC %",
            "full AUC %", "epoch s syn / full", "bags MB syn / full"]
    body = []
    for r in sorted((r for r in results if "slide" in r), key=lambda r: (r["ipc"], r["method"])):
        bags = r["slide"]["bags"]
        size = f"{1e3 * bags['synthetic']['bag_gb']:.2f} / {1e3 * bags['full']['bag_gb']:.2f}"
        for model, m in r["slide"]["models"].items():
            syn, full = m["synthetic"], m["full"]
            body.append([r["method"], str(r["ipc"]), model, _pct(syn["acc"]), _pct(full["acc"]),
                         _pct(syn["auc"]), _pct(full["auc"]),
                         f"{syn['epoch_time_s']:.3f} / {full['epoch_time_s']:.3f}", size])
    return head, body


def transfer_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of cross-centre transfer: per direction and level, accuracy of the
    pre-trained model and after fine-tuning on synthetic or full source data, with time and
    storage."""
    head = ["method", "ipc", "target <- source", "level", "pre-trained acc %", "synthetic acc %",
            "full acc %", "fine-tune s syn / full", "storage MB syn / full"]
    body = []
    for r in sorted(results, key=lambda r: (r["ipc"], r["method"])):
        for d in r["directions"]:
            for level, key, size in (("patch", "patch", "storage_gb"), ("slide", "slide", "bag_gb")):
                x = d[key]
                name = x.get("arch") or x.get("model")
                body.append([r["method"], str(r["ipc"]), f"{d['target']} <- {d['source']}",
                             f"{level} ({name})", _pct(x["pretrained"]["acc"]),
                             _pct(x["synthetic"]["acc"]), _pct(x["full"]["acc"]),
                             f"{x['synthetic']['train_time_s']:.1f} / {x['full']['train_time_s']:.1f}",
                             f"{1e3 * x['synthetic'][size]:.2f} / {1e3 * x['full'][size]:.2f}"])
    return head, body


def _markdown(head: list[str], body: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(cells) + " |" for cells in body])


def slide_table(folder: str | Path) -> str | None:
    """Markdown table of the slide level of every result file in ``folder`` that has one; None
    when none has."""
    results = [read_json(p, "tables") for p in result_files(folder)]
    head, body = slide_rows(results)
    if not body:
        return None
    slide = next(r["slide"] for r in results if "slide" in r)
    runs = len(next(iter(slide["models"].values()))["synthetic"]["acc"]["runs"])
    return "\n".join(_markdown(head, body) + ["", (
        f"Mean ± std over {runs} seeded training runs per model, on the per-slide synthetic bags "
        f"and on the full real bags of the training slides ({slide['encoder']} features), tested "
        f"on the {slide['test_slides']} real test slides. Generated by `python -m "
        f"histodistill.tables {Path(folder).as_posix()}` from the result JSON files.")])


def transfer_table(folder: str | Path) -> str | None:
    """Markdown table of every cross-centre transfer result in ``folder``; None when there is
    none."""
    results = [read_json(p, "tables") for p in sorted(Path(folder).glob("transfer_*.json"))]
    if not results:
        return None
    runs = results[0]["config"]["transfer"]["runs"]
    return "\n".join(_markdown(*transfer_rows(results)) + ["", (
        f"Mean ± std over {runs} runs; pre-trained on the target centre's real data, fine-tuned "
        f"{results[0]['config']['transfer']['finetune']['epochs']} epochs on the source centre's "
        f"synthetic or full data, tested on the real test split. Generated by `python -m "
        f"histodistill.tables {Path(folder).as_posix()}`.")])


def generate_table(folder: str | Path) -> str | None:
    """Markdown table of the generators' quality files (``generate/<generator>_quality.json``,
    rule ``generator_quality``) in ``folder``; None when there is none."""
    files = sorted(Path(folder).glob("generate/*_quality.json"))
    if not files:
        return None
    body = []
    for path in files:
        record = read_json(path, "tables")
        per_class = record.get("class_agreement_per_class")
        agree = "-" if per_class is None else (
            f"{100 * record['class_agreement']:.1f} ("
            + ", ".join(f"{name} {100 * v:.0f}" for name, v in per_class.items()) + ")")
        real = "-" if "real_agreement" not in record else f"{100 * record['real_agreement']:.1f}"
        sampling = ", ".join(f"{k} {v}" for k, v in sorted((record.get("sampling") or {}).items()))
        body.append([f"`{record['generator']}`", sampling, str(record["n_synthetic"]),
                     f"{record['fid_in_domain']:.1f}", f"{record['precision']:.3f}",
                     f"{record['recall']:.3f}", agree, real])
    head = ["generator", "sampling", "samples", "FID (in-domain)", "precision", "recall",
            "class agreement % (per class)", "real agreement %"]
    return "\n".join(_markdown(head, body) + ["", (
        "In the feature space of the pipeline's supervised encoder, against at most "
        f"{read_json(files[0], 'tables')['n_real']} real training patches. Class agreement: share of "
        "samples its classifier head assigns to the class they were generated for (real "
        "agreement: the same on the real patches). Generated by `python -m histodistill.tables "
        f"{Path(folder).as_posix()}` from `generate/*_quality.json`.")])


def augment_table(path: str | Path) -> str:
    """Markdown table of one augmentation study (``augment_<method>.json``, rule
    ``augment_study``): a row per setting."""
    study = read_json(Path(path), "tables")
    lines = ["| added | synthetic per class | acc % | macro F1 % | sensitivity % | specificity % | FID (in-domain) |",
             "|---|---|---|---|---|---|---|"]
    for row in study["settings"]:
        added = "none" if row["synthetic_per_class"] == 0 else f"{row['setting']} {100 * row['ratio']:.0f} %"
        fid = "-" if row["fid_in_domain"] is None else f"{row['fid_in_domain']:.1f}"
        lines.append(f"| {added} | {row['synthetic_per_class']} | {_pct(row['acc'])} | {_pct(row['f1'])} | "
                     f"{_pct(row['sensitivity'])} | {_pct(row['specificity'])} | {fid} |")
    lines.append("")
    lines.append(f"{study['arch']} trained on {study['real_per_class']} real patches per class "
                 f"({100 * study['fraction']:.0f} % of the training split) plus the synthetic images "
                 f"added, chosen by `{study['selector']}` (or at random); mean ± std over "
                 f"{len(study['settings'][0]['acc']['runs'])} runs on the real test split. Generated by "
                 f"`python -m histodistill.tables --augment {Path(path).as_posix()}`.")
    return "\n".join(lines)


def update_block(readme: str | Path, name: str, body: str) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``readme``."""
    text = Path(readme).read_text()
    pattern = re.compile(rf"(<!-- {re.escape(name)}:start -->\n).*?(<!-- {re.escape(name)}:end -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"{readme} has no <!-- {name}:start/end --> markers")
    Path(readme).write_text(pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text))


def update_readme(readme: str | Path, folder: str | Path, bench: str | Path | None = None) -> None:
    """Refresh the dataset's results table in ``readme`` (which must have its block) and every
    other block of the dataset it holds; when ``bench`` is given, every benchmark block
    ``<!-- bench:<name> -->`` from ``<bench>/<name>.txt``."""
    name = f"results:{Path(folder).name}"
    if f"<!-- {name}:start -->" not in Path(readme).read_text():
        raise ValueError(f"{readme} has no <!-- {name}:start/end --> markers")
    _refresh(readme, folder, bench)


def markdown_files(paths: list[str | Path]) -> list[Path]:
    """The Markdown files named by ``paths``: each a file, or a folder searched for ``*.md``."""
    files: list[Path] = []
    for path in map(Path, paths):
        files += sorted(path.rglob("*.md")) if path.is_dir() else [path]
    return files


def update_docs(paths: list[str | Path], folder: str | Path, bench: str | Path | None = None
                ) -> list[Path]:
    """:func:`update_readme` over several Markdown files (or folders of them): each block of the
    dataset (and of ``bench``) is refreshed in whichever file holds it; one of the files must
    hold the dataset's results block. Returns the files that hold a block."""
    files = markdown_files(paths)
    name = f"results:{Path(folder).name}"
    if not any(f"<!-- {name}:start -->" in f.read_text() for f in files):
        raise ValueError(f"{', '.join(str(p) for p in paths)}: no file has <!-- {name}:start/end --> markers")
    return [f for f in files if _refresh(f, folder, bench)]


def _refresh(path: str | Path, folder: str | Path, bench: str | Path | None) -> bool:
    """Refresh every block of ``folder``'s dataset (and of ``bench``) that ``path`` holds;
    whether it holds any."""
    dataset = Path(folder).name
    found = False

    def has(name: str) -> bool:
        return f"<!-- {name}:start -->" in Path(path).read_text()

    if has(f"results:{dataset}"):
        update_block(path, f"results:{dataset}", table(folder))
        found = True
    for kind, make in (("privacy", privacy_table), ("slide", slide_table),
                       ("transfer", transfer_table), ("generate", generate_table),
                       ("seeds", seeds_table),
                       ("other", lambda f: table(f, "other"))):
        if has(f"{kind}:{dataset}"):
            found = True
            text = make(folder)
            if text is not None:  # nothing of that kind built yet: the block keeps what it has
                update_block(path, f"{kind}:{dataset}", text)
    for augment in sorted(Path(folder).glob("augment_*.json")):
        name = f"{augment.stem}:{dataset}"
        if has(name):
            update_block(path, name, augment_table(augment))
            found = True
    if bench is not None:
        for figures_file in sorted(Path(bench).glob("*.txt")):
            if has(f"bench:{figures_file.stem}"):
                figures = "\n".join("    " + line for line in figures_file.read_text().strip().splitlines())
                update_block(path, f"bench:{figures_file.stem}", figures)
                found = True
    return found


def main(argv: list[str] | None = None) -> None:
    """``histodistill tables``: results tables from result JSON files (see the module's usage)."""
    parser = argparse.ArgumentParser(prog="histodistill tables",
                                     description="results table from result JSON files")
    parser.add_argument("folder", nargs="?")
    parser.add_argument("--readme", action="append", metavar="PATH",
                        help="Markdown file, or folder of them (docs), whose blocks are refreshed; repeatable")
    parser.add_argument("--bench", help="folder of benchmark figure files (results/bench)")
    parser.add_argument("--augment", help="an augmentation study's JSON file: print its table")
    parser.add_argument("--protocol", choices=["own", "other"], default="own",
                        help="each method's own stain protocol, or the other one")
    parser.add_argument("--collect", metavar="DOCS_FOLDER",
                        help="copy the folder's small result JSON files here (committed)")
    parser.add_argument("--frontier", metavar="PNG",
                        help="draw accuracy against memorised share (pixel space) per method")
    args = parser.parse_args(argv)
    if args.augment:
        print(augment_table(args.augment))
    elif args.collect:
        for path in collect(args.folder, args.collect):
            print(path)
    elif args.frontier:
        for point in frontier(args.folder, args.frontier):
            print(point)
    elif args.folder is None:
        parser.error("give a results folder or --augment FILE")
    else:
        if args.readme:
            update_docs(args.readme, args.folder, args.bench)
        print(table(args.folder, args.protocol))
        privacy = privacy_table(args.folder)
        if privacy:
            print("\n" + privacy)


if __name__ == "__main__":
    main()
