"""The shareable package of a distilled set: its images, labels, a datasheet and a manifest of
sha256 checksums, and nothing from the real patches.

``results/<dataset>/<method>_ipc<N>.share/``::

    images/<class>/<k>.png   one PNG per synthetic image, by class
    images.zarr/             the same images (N, 3, H, W) uint8 and labels, as the pipeline uses
    labels.csv               file, label index, class name
    DATASHEET.md             source cohort, method and settings, evaluation, privacy audit,
                             intended use, licence, opt-ins
    manifest.json            every other file with its size and sha256, and what the set is
    SHA256SUMS               the same checksums for `sha256sum -c SHA256SUMS`

A guard runs first: a coreset (real patients' patches) or a set whose privacy audit flags
memorised images is refused with a message naming the figure, unless the user opts in
(``privacy.package.allow_real_patches`` / ``allow_memorised``); the datasheet then says so.
The distilled set's provenance (``sources``: store rows) and the store's path are not copied.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from PIL import Image

from histodistill import catalogue
from histodistill.data.store import SPLITS, PatchStore
from histodistill.io import InputError, atomic_path, read_json, write_json

FORMAT = "histodistill-share/1"
# Files a package holds beside those its manifest lists: the checksum files themselves, and the
# empty marker Snakemake puts into every directory output.
UNLISTED = {"manifest.json", "SHA256SUMS", ".snakemake_timestamp"}
Block = tuple[str, Any]  # ("h1" | "h2" | "p" | "ul" | "table" | "code", content)


def is_coreset(method: str) -> bool:
    """Whether ``method``'s images are real patches (a coreset, or a selection of real
    patches: its catalogue row)."""
    return catalogue.get(method).real_patches


def guard(result: dict[str, Any], settings: dict[str, Any], where: str | os.PathLike) -> list[str]:
    """Refuse to package a coreset or a set with memorised images unless opted in.

    Returns the statements the datasheet must make about the opt-ins used. Raises InputError
    (stage ``package``) naming the figure and the setting otherwise. A coreset's memorised
    images are its real patches, so ``allow_real_patches`` covers them.
    """
    privacy = result.get("privacy")
    if not privacy:
        raise InputError("package", where, "has no privacy audit ('privacy' section): a set is "
                         "packaged only after rule privacy_audit")
    name = f"{result['method']}_ipc{result['ipc']}"
    memorised = float(privacy["memorised"])
    worst = max(privacy["spaces"], key=lambda s: privacy["spaces"][s]["memorised"])
    figure = (f"privacy.memorised = {memorised:.2f} ({privacy['spaces'][worst]['memorised_count']} of "
              f"{privacy['n_synthetic']} images, {worst} space), attack AUC "
              f"{privacy['attack_auc']:.2f}")
    statements = []
    if is_coreset(result["method"]):
        if not settings["allow_real_patches"]:
            raise InputError("package", where, f"refused: {name} is a coreset: its "
                             f"{privacy['n_synthetic']} images are real patients' patches ({figure}). "
                             "Set privacy.package.allow_real_patches: true to share them anyway; "
                             "the datasheet will say so")
        statements.append(f"OPT-IN allow_real_patches: true. These images are real patches of "
                          f"the source cohort's patients, not synthetic ({figure}).")
    elif memorised > 0:
        if not settings["allow_memorised"]:
            raise InputError("package", where, f"refused: {name} has memorised images: {figure}. "
                             f"Look at the closest pairs (results/{result['dataset']}/privacy/"
                             f"{name}_pairs.png); set privacy.package.allow_memorised: true to "
                             "share it anyway; the datasheet will say so")
        statements.append(f"OPT-IN allow_memorised: true. The privacy audit flags memorised "
                          f"images and the set was released anyway ({figure}).")
    return statements


def _ci(attack: dict[str, Any]) -> str:
    return f"{attack['auc']:.3f} [{attack['ci'][0]:.3f}, {attack['ci'][1]:.3f}]"


def _cohort(store: PatchStore, dataset: str, description: str | None) -> list[Block]:
    labels, split = store.array("label"), store.array("split")
    names = store.class_names
    rows = [[s] + [str(int(((split == i) & (labels == c)).sum())) for c in range(len(names))]
            for i, s in enumerate(SPLITS) if (split == i).any()]
    attrs = store.attrs
    facts = [f"dataset: `{dataset}` (source format: {attrs.get('source', 'unknown')})",
             f"classes: {', '.join(names)}",
             f"patch size: {attrs.get('patch_size')} px"]
    for key, what in (("magnification", "magnification"), ("mpp", "microns per pixel")):
        if attrs.get(key) is not None:
            facts.append(f"{what}: {attrs[key]}")
    slides = attrs.get("slides") or []
    if slides:
        facts.append(f"slides: {len(slides)}")
    return [("h2", "Source cohort"), ("p", description or "No description given (set "
             "privacy.package.cohort for this dataset)."), ("ul", facts),
            ("p", "Patches per split and class (counts only; no real patch is in this package):"),
            ("table", (["split", *names], rows))]


def _evaluation(result: dict[str, Any]) -> list[Block]:
    rows = []
    for arch, summary in result["patch"].items():
        full = result.get("full", {}).get(arch, {})
        rows.append([arch, f"{100 * summary['acc']['mean']:.1f} ± {100 * summary['acc']['std']:.1f}",
                     f"{100 * summary['auc']['mean']:.1f} ± {100 * summary['auc']['std']:.1f}",
                     str(len(summary["acc"]["runs"])),
                     f"{100 * full['acc']['mean']:.1f}" if full else "-"])
    return [("h2", "Evaluation"),
            ("p", "Networks trained on this set alone, tested on the source cohort's real test "
                  "split (mean ± std over seeded runs); full data: the same network trained on "
                  "the whole real training split."),
            ("table", (["architecture", "accuracy %", "AUC %", "runs", "full-data accuracy %"], rows))]


def _privacy(privacy: dict[str, Any], statements: list[str]) -> list[Block]:
    rows = []
    for space, s in privacy["spaces"].items():
        attack = s["attack"]
        rows.append([space, f"{s['synthetic_median']:.4g}", f"{s['heldout_median']:.4g}",
                     f"{s['median_ratio']:.3f}", f"{s['memorised']:.3f}",
                     *(_ci(attack[k]) if k in attack else "-" for k in ("sources", "random", "null"))])
    held = privacy["heldout_split"]
    return [("h2", "Privacy audit"),
            ("p", f"Each image's distance to its nearest real training patch ({privacy['n_train']} "
                  f"patches), against the same distance for {privacy['n_heldout']} real held-out "
                  f"patches ({held} split) that were never trained on. Memorised: share of images "
                  f"closer than the {privacy['percentile']:g}th percentile of the held-out "
                  "distances. Attack AUC: a membership-inference attack that scores real patches "
                  "by their distance to the nearest image of this set and tries to tell training "
                  "patches from held-out ones (0.5: nothing leaks; 1.0: every member found), with "
                  "a 95 % bootstrap interval; 'sources' are the training patches the images were "
                  "made from (coreset picks, real initialisations), 'random' random training "
                  "patches; 'control' is the random attack against unseen real patches in place "
                  "of this set: what the attack reads on this cohort when nothing leaks. Pixel "
                  "distance: RMS difference in [0, 1]; feature distance: Euclidean between "
                  f"normalised features of the '{privacy['encoder']}' encoder."),
            ("table", (["space", "median distance (set)", f"median distance ({held})",
                        "ratio", "memorised", "attack AUC (sources)", "attack AUC (random)",
                        "attack AUC (control)"], rows)),
            ("p", f"Headline: memorised {privacy['memorised']:.3f}, attack AUC "
                  f"{privacy['attack_auc']:.3f} [{privacy['attack_ci'][0]:.3f}, "
                  f"{privacy['attack_ci'][1]:.3f}] ({privacy['attack_members']} members, "
                  f"{privacy['attack_space']} space)."),
            ("ul", statements or ["No opt-in was needed: not a coreset, no memorised image."])]


def datasheet(result: dict[str, Any], store: PatchStore, settings: dict[str, Any],
              statements: list[str], files: list[str]) -> list[Block]:
    """The datasheet's blocks (rendered to Markdown for the package, HTML for the report)."""
    method, ipc, dataset = result["method"], result["ipc"], result["dataset"]
    kind = ("a coreset of real patches" if is_coreset(method)
            else "synthetic images distilled from real patches")
    n = result["privacy"]["n_synthetic"]
    versions = ", ".join(f"{k} {v}" for k, v in result.get("versions", {}).items())
    return [("h1", f"Datasheet: {dataset}, {method}, {ipc} images per class"),
            ("p", f"{n} images of {store.attrs.get('patch_size')} px, {kind}, made by histodistill "
                  f"with method `{method}`."),
            *(("p", f"**{s}**") for s in statements),
            *_cohort(store, dataset, settings["cohort"]),
            ("h2", "Method and settings"),
            ("ul", [f"method: `{method}`, {ipc} images per class, seed {result['config']['seed']}",
                    f"distillation time: {result['distill']['seconds']:.0f} s on "
                    f"{result['distill']['device']}", f"software: {versions}"]),
            ("code", json.dumps(result["config"]["distill"], indent=2, sort_keys=True)),
            *_evaluation(result),
            *_privacy(result["privacy"], statements),
            ("h2", "Intended use"), ("p", settings["intended_use"] or "Not stated."),
            ("h2", "Licence"), ("p", settings["licence"] or "Not specified: set "
                                "privacy.package.licence before sharing."),
            ("h2", "Files"), ("ul", files)]


def to_markdown(blocks: list[Block]) -> str:
    """Markdown of datasheet blocks."""
    out = []
    for kind, value in blocks:
        if kind in ("h1", "h2"):
            out.append(("# " if kind == "h1" else "## ") + value)
        elif kind == "p":
            out.append(value)
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in value))
        elif kind == "code":
            out.append(f"```json\n{value}\n```")
        elif kind == "table":
            head, rows = value
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            out.append("\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]))
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """HTML of the Markdown inline forms the datasheet uses: `code` and **bold**."""
    parts = html.escape(text).split("`")
    text = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))


def to_html(blocks: list[Block]) -> str:
    """A standalone HTML page of datasheet blocks (for the Snakemake report)."""
    out = []
    for kind, value in blocks:
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{_inline(value)}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline(value)}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in value) + "</ul>")
        elif kind == "code":
            out.append(f"<pre>{html.escape(value)}</pre>")
        elif kind == "table":
            head, rows = value
            cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                           for r in rows)
            out.append(f"<table border='1' cellpadding='4'><tr>{cells}</tr>{body}</table>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Datasheet</title></head>"
            "<body>" + "\n".join(out) + "</body></html>\n")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_images(root: Path, images: np.ndarray, labels: np.ndarray, names: list[str],
                  attrs: dict[str, Any]) -> None:
    rows = ["file,label,class"]
    for c, name in enumerate(names):
        (root / "images" / name).mkdir(parents=True)
        for k, j in enumerate(np.flatnonzero(labels == c)):
            rel = f"images/{name}/{k:03d}.png"
            Image.fromarray(images[j].transpose(1, 2, 0)).save(root / rel, format="PNG")
            rows.append(f"{rel},{c},{name}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    group = zarr.open_group(str(root / "images.zarr"), mode="w")
    group.create_array("images", data=images, chunks=images.shape)
    group.create_array("labels", data=labels)
    group.attrs.update(attrs)


def write_package(distilled: str | os.PathLike, result_path: str | os.PathLike,
                  store_path: str | os.PathLike, *, out: str | os.PathLike,
                  datasheet_html: str | os.PathLike, settings: dict[str, Any]) -> dict[str, Any]:
    """Rule ``package``: the guard, then the package directory ``out`` (written atomically) and
    its datasheet as HTML for the report. Returns the manifest."""
    result = read_json(result_path, "package")
    statements = guard(result, settings, result_path)
    group = zarr.open_group(str(distilled), mode="r")
    images, labels = group["images"][:], group["labels"][:].astype(np.int64)
    names = list(group.attrs["class_names"])
    store = PatchStore(store_path)
    if (result["method"], result["ipc"]) != (group.attrs["method"], group.attrs["ipc"]):
        raise InputError("package", result_path, f"is for {result['method']}_ipc{result['ipc']}, "
                         f"not {distilled}")
    attrs = {"dataset": result["dataset"], "method": result["method"], "ipc": result["ipc"],
             "class_names": names, "patch_size": int(images.shape[-1]),
             "real_patches": is_coreset(result["method"]), "opt_ins": statements}
    with atomic_path(out) as tmp:
        tmp.mkdir()
        _write_images(tmp, images, labels, names, attrs)
        listed = ["images/<class>/<k>.png: the images as PNG, one folder per class",
                  "images.zarr: the images (N, 3, H, W) uint8 and labels (zarr 3)",
                  "labels.csv: file, label index, class name", "DATASHEET.md: this datasheet",
                  "manifest.json, SHA256SUMS: sha256 checksums of every file"]
        blocks = datasheet(result, store, settings, statements, listed)
        (tmp / "DATASHEET.md").write_text(to_markdown(blocks))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        entries = [{"path": p.relative_to(tmp).as_posix(), "bytes": p.stat().st_size,
                    "sha256": sha256(p)} for p in files]
        manifest = {"format": FORMAT, **attrs, "n_images": len(images),
                    "class_counts": np.bincount(labels, minlength=len(names)).tolist(),
                    "privacy": {k: result["privacy"][k] for k in
                                ("memorised", "attack_auc", "attack_ci", "attack_members",
                                 "attack_space", "heldout_split")},
                    "licence": settings["licence"], "intended_use": settings["intended_use"],
                    "files": entries}
        write_json(tmp / "manifest.json", manifest)
        (tmp / "SHA256SUMS").write_text("".join(f"{e['sha256']}  {e['path']}\n" for e in entries))
    with atomic_path(datasheet_html) as tmp:
        tmp.write_text(to_html(blocks))
    return manifest


def verify_package(path: str | os.PathLike) -> None:
    """Check every file the manifest lists against its size and sha256, and that no other file
    is there (but :data:`UNLISTED`); raises InputError naming the first mismatching files."""
    root = Path(path)
    manifest = read_json(root / "manifest.json", "package")
    listed = {e["path"]: e for e in manifest["files"]}
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    problems = [f"{p}: not in the manifest" for p in sorted(present - set(listed) - UNLISTED)]
    for rel, entry in listed.items():
        f = root / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
        elif f.stat().st_size != entry["bytes"] or sha256(f) != entry["sha256"]:
            problems.append(f"{rel}: checksum mismatch")
    if problems:
        raise InputError("package", root, "does not match its manifest: " + "; ".join(problems[:5]))
