"""The documentation site: each usage page's config block, pointed at a tiny dataset of its
kind, validates against the schema and reads that dataset (and, in a dry run, plans the job
that reads it); the configuration reference is a fresh render of the schema; the generated
tables' blocks are where `make table` looks for them; the README stays short."""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import ROOT, planned_jobs, snakemake, tiny_config
from histodistill import cli, schema_doc, tables
from histodistill import config as hdconfig
from histodistill.data import ingest
from histodistill.slides import cohort

DOCS = ROOT / "docs"
PLACEHOLDER = "/path/to/dataset"
BLOCK = re.compile(r"<!-- config-block -->\n```yaml\n(.*?)```", re.S)


def config_block(page: str, root: Path) -> dict:
    """The page's one marked config block, its placeholder root replaced by ``root``."""
    blocks = BLOCK.findall((DOCS / "usage" / page).read_text())
    assert len(blocks) == 1, f"{page}: expected one <!-- config-block --> yaml block"
    assert PLACEHOLDER in blocks[0], f"{page}: the block's root is not {PLACEHOLDER}"
    return yaml.safe_load(blocks[0].replace(PLACEHOLDER, str(root)))


def _png(path: Path, level: int, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(rng.normal(level, 20, (16, 16, 3)), 0, 255).astype(np.uint8)).save(path)


def camelyon16_root(root: Path, cohort_dir: Path) -> None:
    shutil.copytree(cohort_dir, root)


def slide_table_root(root: Path, cohort_dir: Path) -> None:
    """The small cohort's slides in root/slides and its slide-label table as labels.csv."""
    (root / "slides").mkdir(parents=True)
    for slide in cohort_dir.rglob("*.tif"):
        shutil.copy(slide, root / "slides" / slide.name)
    with open(cohort_dir / "slides.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide", "label", "split"])
        writer.writeheader()
        writer.writerows({"slide": r["slide"], "label": r["label"], "split": r["split"]} for r in rows)


def imagefolder_root(root: Path, cohort_dir: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for cls, level in (("normal", 60), ("tumor", 190)):
            for k in range(n):
                _png(root / split / cls / f"{k}.png", level, rng)


def csv_root(root: Path, cohort_dir: Path) -> None:
    rng = np.random.default_rng(1)
    for split, n in (("train", 4), ("test", 2)):
        rows = []
        for cls, level in (("normal", 60), ("tumor", 190)):
            for k in range(n):
                name = f"{split}_{cls}_{k}.png"
                _png(root / "images" / name, level, rng)
                rows.append({"image": name, "label": cls})
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "label"])
            writer.writeheader()
            writer.writerows(rows)


def npz_root(root: Path, cohort_dir: Path) -> None:
    rng = np.random.default_rng(2)
    root.mkdir(parents=True)
    arrays = {}
    for split, n in (("train", 8), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.array([0, 1] * (n // 2))
    np.savez(root / "patches.npz", **arrays)


# page -> (builder of a tiny dataset of its kind, the rule that reads the raw data)
PAGES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "camelyon16.md": (camelyon16_root, "cohort"),
    "slide_table.md": (slide_table_root, "cohort"),
    "imagefolder.md": (imagefolder_root, "ingest"),
    "csv.md": (csv_root, "ingest"),
    "npz.md": (npz_root, "ingest"),
}


def test_every_usage_page_has_its_block_and_is_in_the_nav():
    pages = {p.name for p in (DOCS / "usage").glob("*.md")} - {"index.md"}
    assert pages == set(PAGES)
    nav_files: list[str] = []

    def walk(item: object) -> None:
        if isinstance(item, str):
            nav_files.append(item)
        elif isinstance(item, dict):
            for value in item.values():
                walk(value)
        elif isinstance(item, list):
            for value in item:
                walk(value)

    walk(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    assert sorted(nav_files) == sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))


@pytest.mark.parametrize("page", sorted(PAGES))
def test_usage_config_block_validates_and_reads_its_dataset(page, small_cohort, tmp_path):
    """Merged into the shipped config.yaml the block validates; its entry then reads the tiny
    dataset it describes: the slide table is built, or the patches are ingested."""
    build, _ = PAGES[page]
    root = tmp_path / "data"
    build(root, small_cohort)
    block = config_block(page, root)
    (name,) = block["datasets"]
    cfg = hdconfig.validate(hdconfig.merge(hdconfig.read(hdconfig.CONFIG), block))
    entry = cfg["datasets"][name]
    if entry["format"] == "wsi":
        rows = cohort.build_table(name, entry)
        assert {r["label"] for r in rows} == set(entry["classes"])
        assert {r["split"] for r in rows} == {"train", "test"}
    else:
        from histodistill.data.store import PatchStore

        store = PatchStore(ingest.ingest_dataset(name, entry, tmp_path / "patches.zarr"))
        assert store.class_names == ["normal", "tumor"] and len(store) == 12


@pytest.mark.slow
@pytest.mark.parametrize("page", sorted(PAGES))
def test_usage_config_block_plans_its_first_job(page, small_cohort, tmp_path):
    """A dry run of a result file of the block's dataset, the block merged into the shipped
    config (with the overlays, as the tests' tiny config), plans the job that reads the data."""
    build, rule = PAGES[page]
    root = tmp_path / "data"
    build(root, small_cohort)
    block = config_block(page, root)
    (name,) = block["datasets"]
    tiny_config(tmp_path / "config.yaml")
    cfg = hdconfig.merge(yaml.safe_load((tmp_path / "config.yaml").read_text()), block)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    jobs = planned_jobs(snakemake(tmp_path, "-n", f"results/{name}/random_ipc2.json"))
    assert jobs.get(rule) == 1, jobs


def test_the_configuration_reference_is_a_fresh_render_of_the_schema(tmp_path):
    committed = (DOCS / "configuration.md").read_text()
    assert committed == schema_doc.render(hdconfig.load_schema()), (
        "docs/configuration.md is out of date: run `histodistill schema-doc --out docs/configuration.md`")
    cli.main(["schema-doc", "--out", str(tmp_path / "c.md")])
    assert (tmp_path / "c.md").read_text() == committed


def test_every_schema_property_is_in_the_configuration_reference():
    doc = (DOCS / "configuration.md").read_text()
    with open(hdconfig.SCHEMA) as f:
        schema = yaml.safe_load(f)
    names: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            names.update(node.get("properties", {}) if isinstance(node.get("properties"), dict) else {})
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    assert len(names) > 200
    cells = set(re.findall(r"^\| `([^`]+)` \|", doc, re.M))
    missing = sorted(n for n in names if not any(c == n or c.endswith("." + n) for c in cells))
    assert not missing, f"schema properties without a row in docs/configuration.md: {missing}"
    for section in schema["properties"]:
        assert f"\n## {section}\n" in doc


def test_the_reference_escapes_markup_and_links_shared_definitions():
    schema = {"properties": {"a": {"type": "object", "default": {}, "description": "x | y <z> _w",
                                   "properties": {"t": {"$ref": "#/$defs/t", "default": {"n": 1}},
                                                  "u": {"$ref": "#/$defs/t"},
                                                  "k": {"$ref": "#/$defs/kind", "default": "p"}}}},
              "$defs": {"t": {"type": "object", "description": "shared", "properties": {
                  "n": {"type": ["integer", "null"], "description": "`code_span` n"}}},
                  "kind": {"enum": ["p", "q"], "description": "a kind"}}}
    text = schema_doc.render(schema)
    assert "| `a` | object | `{}` | x \\| y &lt;z&gt; \\_w |" in text
    assert "| `a.t` | [t](#t) | `{n: 1}` | shared |" in text
    assert "| `a.k` | [kind](#kind) | `p` | a kind |" in text
    assert "### t" in text and "| `n` | integer or null |  | `code_span` n |" in text
    assert "Type: one of `p`, `q`." in text


# the blocks `make table` (results/demo and results/bench) and the demo_patches and PCam runs
# refresh: each must sit in one page of docs/
BLOCKS = ([f"{kind}:demo" for kind in ("results", "privacy", "slide", "transfer", "generate")]
          + [f"bench:{name}" for name in ("tiling", "distill", "memory", "trajectory", "mil", "privacy",
                                          "generate", "select", "stream")]
          + ["results:demo_patches", "generate:demo_patches", "augment_centroid:demo_patches",
             "results:pcam", "other:pcam", "seeds:pcam", "privacy:pcam", "generate:pcam",
             "augment_centroid:pcam"])


def test_generated_blocks_live_in_the_docs_once_and_are_refreshed_there(tmp_path):
    pages = {p: p.read_text() for p in DOCS.rglob("*.md")}
    for name in BLOCKS:
        holders = [p for p, text in pages.items() if f"<!-- {name}:start -->" in text]
        assert len(holders) == 1, (name, holders)
        assert f"<!-- {name}:end -->" in pages[holders[0]]
    assert "<!--" not in (ROOT / "README.md").read_text()
    docs = shutil.copytree(DOCS, tmp_path / "docs")
    folder = tmp_path / "results" / "demo"
    folder.mkdir(parents=True)
    metric = {"mean": 0.5, "std": 0.01, "runs": [0.49, 0.51]}
    arch = {"acc": metric, "f1": metric, "auc": metric, "epoch_time_s": 0.1, "train_time_s": 1.0}
    result = {"dataset": "demo", "method": "random", "ipc": 10, "patch": {"convnet": arch},
              "full": {"convnet": arch}, "distill": {"seconds": 0.0}, "saturated_fraction": 0.0}
    (folder / "random_ipc10.json").write_text(json.dumps(result))
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "tiling.txt").write_text("tiling_speedup: 9.99\n")
    changed = tables.update_docs([docs], folder, bench)
    assert {p.relative_to(docs).as_posix() for p in changed} >= {"methods/evaluation.md", "methods/tiling.md"}
    assert "| random | 10 |" in (docs / "methods/evaluation.md").read_text()
    assert "    tiling_speedup: 9.99\n<!-- bench:tiling:end -->" in (docs / "methods/tiling.md").read_text()
    with pytest.raises(ValueError, match="no file has <!-- results:demo:start/end"):
        tables.update_docs([docs / "methods/tiling.md"], folder)


def test_the_readme_is_short_and_keeps_the_quick_start():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 220
    assert "    make demo    # " in readme and "    make test    # " in readme
    for path in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / path).exists(), path
