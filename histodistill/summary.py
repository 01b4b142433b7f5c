"""Print what a pipeline run produced for one dataset and where it lies (end of `make demo`).

Usage: python -m histodistill.summary results/<dataset>
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from histodistill.data.store import SPLITS, PatchStore
from histodistill.io import read_json
from histodistill.tables import result_files


def summarise(folder: str | Path) -> str:
    """A few lines on the patch store, the stain template and any result JSON in ``folder``."""
    folder = Path(folder)
    lines = [f"results in {folder}/"]
    store_path = folder / "patches.zarr"
    if store_path.exists():
        store = PatchStore(store_path)
        label, split = store.array("label"), store.array("split")
        counts = ", ".join(
            f"{SPLITS[s]}: " + " / ".join(f"{int((label[split == s] == c).sum())} {name}"
                                           for c, name in enumerate(store.class_names))
            for s in np.unique(split))
        lines.append(f"  patches   {store_path}  {len(store)} patches of "
                     f"{store.attrs['patch_size']} px ({counts})")
    template = folder / "stain" / "template.json"
    if template.exists():
        info = read_json(template, "summary")
        lines.append(f"  stain     {template}  template patch {info['index']} "
                     f"(slide {info['slide'] or '-'}), image {template.with_suffix('.png')}")
    # a set's result file, or its patch-level evaluation while the later stages are not built
    files = {p.name: p for p in result_files(folder / "patch_eval")}
    files.update({p.name: p for p in result_files(folder)})
    for _, result in sorted(files.items()):
        info = read_json(result, "summary")
        accs = ", ".join(f"{arch} acc {100 * m['acc']['mean']:.1f} ± {100 * m['acc']['std']:.1f}%"
                         for arch, m in info["patch"].items())
        lines.append(f"  result    {result}  ({accs})")
        if "slide" in info:
            mil = ", ".join(f"{name} {100 * m['synthetic']['acc']['mean']:.1f}% "
                            f"(full bags {100 * m['full']['acc']['mean']:.1f}%)"
                            for name, m in info["slide"]["models"].items())
            lines.append(f"  slides    {mil}")
        grid = folder / "distilled" / f"{result.stem}.png"
        if grid.exists():
            lines.append(f"  images    {grid}")
        if "privacy" in info:
            p = info["privacy"]
            lines.append(f"  privacy   {folder / 'privacy' / (result.stem + '_pairs.png')}  "
                         f"(memorised {p['memorised']:.2f}, attack AUC {p['attack_auc']:.2f} "
                         f"with {p['attack_members']} members)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``histodistill summary [FOLDER]``: where a dataset's results and figures are."""
    args = sys.argv[1:] if argv is None else argv
    print(summarise(args[0] if args else "results/demo"))


if __name__ == "__main__":
    main()
