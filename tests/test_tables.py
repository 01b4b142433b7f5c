"""The README results table is generated from result JSON files."""

from __future__ import annotations

import json

import pytest

from histodistill import tables


def result(method: str, acc: float) -> dict:
    metric = {"mean": acc, "std": 0.01, "runs": [acc - 0.01, acc + 0.01]}
    arch = {"acc": metric, "f1": metric, "auc": metric, "epoch_time_s": 0.1, "train_time_s": 1.0}
    return {"dataset": "toy", "method": method, "ipc": 10, "patch": {"convnet": arch},
            "full": {"convnet": arch}, "distill": {"seconds": 12.0, "peak_mem_mb": 1.0},
            "saturated_fraction": 0.025}


def test_table_rows_and_readme_block(tmp_path):
    folder = tmp_path / "toy"
    folder.mkdir()
    for method, acc in [("random", 0.5), ("histodd", 0.75)]:
        (folder / f"{method}_ipc10.json").write_text(json.dumps(result(method, acc)))
    text = tables.table(folder)
    lines = text.splitlines()
    assert lines[2].startswith("| histodd | 10 | off | 75.0 ± 1.0") and lines[3].startswith("| random")
    assert lines[2].endswith("| - | - | 2.5 (!) | 12 | - | - |")  # no audit; saturated % above 2 flagged
    assert "| full data | all |" in text
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:toy:start -->\nold\n<!-- results:toy:end -->\nend\n")
    tables.update_readme(readme, folder)
    body = readme.read_text()
    assert "old" not in body and "75.0 ± 1.0" in body and body.endswith("end\n")
    other = tmp_path / "other"
    other.mkdir()
    (other / "random_ipc10.json").write_text(json.dumps(result("random", 0.5)))
    with pytest.raises(ValueError, match="no <!-- results:other"):
        tables.update_readme(readme, other)
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "speed.txt").write_text("speedup: 3.1\n")
    readme.write_text(body + "<!-- bench:speed:start -->\n    speedup: 1.0\n<!-- bench:speed:end -->\n")
    tables.update_readme(readme, folder, bench)
    assert "    speedup: 3.1\n<!-- bench:speed:end -->" in readme.read_text()


def test_privacy_table_and_readme_block(tmp_path):
    folder = tmp_path / "toy"
    folder.mkdir()
    attack = {"auc": 0.97, "ci": [0.9, 1.0], "members": 20, "nonmembers": 100}
    space = {"memorised": 0.25, "median_ratio": 0.5, "attack": {"sources": attack, "random": {
        **attack, "auc": 0.51, "ci": [0.45, 0.57]}}}
    privacy = {"spaces": {"pixel": space, "feature": {**space, "memorised": 0.1}},
               "attack_space": "pixel", "percentile": 5, "n_heldout": 100, "heldout_split": "test",
               "seconds": 3.2}
    (folder / "histodd_ipc10.json").write_text(json.dumps({**result("histodd", 0.7), "privacy": privacy}))
    (folder / "dm_ipc10.json").write_text(json.dumps(result("dm", 0.6)))  # no audit: no row
    text = tables.privacy_table(folder)
    assert text.splitlines()[2] == ("| histodd | 10 | 0.25 / 0.10 | 0.50 / 0.50 | 0.97 [0.90, 1.00] | "
                                    "0.51 [0.45, 0.57] | - | 3 |")
    assert len([line for line in text.splitlines() if line.startswith("| ")]) == 2 and "test" in text
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:toy:start -->\n<!-- results:toy:end -->\n"
                      "<!-- privacy:toy:start -->\nold\n<!-- privacy:toy:end -->\n")
    tables.update_readme(readme, folder)
    assert "old" not in readme.read_text() and "0.97 [0.90, 1.00]" in readme.read_text()
    (folder / "histodd_ipc10.json").write_text(json.dumps(result("histodd", 0.7)))
    assert tables.privacy_table(folder) is None


def test_generator_quality_table_and_readme_block(tmp_path):
    """One row per quality file, agreement per class in percent; the block is left as it is
    while no generator has been assessed."""
    folder = tmp_path / "toy"
    (folder / "generate").mkdir(parents=True)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:toy:start -->\n<!-- results:toy:end -->\n"
                      "<!-- generate:toy:start -->\nkept\n<!-- generate:toy:end -->\n")
    (folder / "random_ipc10.json").write_text(json.dumps(result("random", 0.5)))
    tables.update_readme(readme, folder)
    assert tables.generate_table(folder) is None and "kept" in readme.read_text()
    quality = {"generator": "uvit", "sampling": {"steps": 50, "cfg_scale": 5.0}, "n_synthetic": 20,
               "n_real": 40, "fid_in_domain": 12.345, "precision": 0.5, "recall": 0.75,
               "class_agreement": 0.6, "class_agreement_per_class": {"a": 1.0, "b": 0.2},
               "real_agreement": 0.9}
    (folder / "generate" / "uvit_quality.json").write_text(json.dumps(quality))
    (folder / "generate" / "other_quality.json").write_text(json.dumps(
        {**quality, "generator": "other", "class_agreement_per_class": None}))
    rows = tables.generate_table(folder).splitlines()
    assert rows[2].startswith("| `other` |") and rows[2].endswith("| - | 90.0 |")
    assert rows[3] == ("| `uvit` | cfg_scale 5.0, steps 50 | 20 | 12.3 | 0.500 | 0.750 | "
                       "60.0 (a 100, b 20) | 90.0 |")
    tables.update_readme(readme, folder)
    assert "kept" not in readme.read_text() and "60.0 (a 100, b 20)" in readme.read_text()


def audited(method: str, acc: float, other_acc: float) -> dict:
    r = result(method, acc)
    metric = {"mean": other_acc, "std": 0.02, "runs": [other_acc]}
    r["stain_norm"] = method == "histodd"
    r["other_protocol"] = {"stain_norm": method != "histodd",
                           "patch": {"convnet": {"acc": metric, "auc": metric}}}
    r["distill"]["image_updates"] = 400
    if method == "histodd":  # chosen among two candidates of 8 and 12 s
        r["distill"]["tuning"] = {"candidates": [{"seconds": 8.0}, {"seconds": 12.0}]}
    r["privacy"] = {"attack_space": "pixel", "spaces": {
        "pixel": {"memorised": 1.0, "attack": {"sources": {"auc": 0.93}}},
        "feature": {"memorised": 0.35, "attack": {}}}}
    return r


def test_the_table_shows_privacy_beside_accuracy_and_either_stain_protocol(tmp_path):
    folder = tmp_path / "toy"
    folder.mkdir()
    for method, acc, other in [("random", 0.5, 0.45), ("histodd", 0.75, 0.6)]:
        (folder / f"{method}_ipc10.json").write_text(json.dumps(audited(method, acc, other)))
    (folder / "budget.json").write_text(json.dumps({"budget_s": 900}))
    own = tables.table(folder).splitlines()
    assert own[2] == ("| histodd | 10 | on | 75.0 ± 1.0 | 75.0 ± 1.0 | 100 / 35 | 0.93 | 2.5 (!) | "
                      "12 | 400 | 20 |")
    assert own[3].startswith("| random | 10 | off | 50.0 ± 1.0")
    assert "Budget: 900 s of distillation" in tables.table(folder)
    other = tables.table(folder, "other").splitlines()
    assert other[2].startswith("| histodd | 10 | off | 60.0 ± 2.0")
    assert other[3].startswith("| random | 10 | on | 45.0 ± 2.0")


def test_seed_summaries_and_collected_files(tmp_path):
    folder = tmp_path / "res"
    (folder / "seeds").mkdir(parents=True)
    (folder / "tuning").mkdir()
    acc = {"mean": 0.6, "std": 0.02, "seeds": [0.58, 0.6, 0.62]}
    (folder / "seeds" / "histodd_ipc10.json").write_text(json.dumps(
        {"method": "histodd", "ipc": 10, "seeds": [0, 1, 2], "patch": {"convnet": {"acc": acc}},
         "distill": {"seconds": {"mean": 901.0}}}))
    (folder / "histodd_ipc10.json").write_text(json.dumps(result("histodd", 0.6)))
    (folder / "tuning" / "histodd_ipc10.json").write_text("{}")
    (folder / "tuning" / "histodd_ipc10_c0.json").write_text("{}")
    (folder / "tuning" / "histodd_ipc10_c0_cost.json").write_text("{}")
    text = tables.seeds_table(folder)
    assert "| histodd | 10 | 3 | 60.0 ± 2.0 | 58.0 / 60.0 / 62.0 | 901 |" in text
    docs = tmp_path / "docs"
    written = {p.relative_to(docs).as_posix() for p in tables.collect(folder, docs)}
    assert written == {"histodd_ipc10.json", "seeds/histodd_ipc10.json", "tuning/histodd_ipc10.json"}
    assert tables.seeds_table(tmp_path / "nothing") is None


def test_the_frontier_plots_each_audited_set_at_its_memorisation_and_accuracy(tmp_path):
    folder = tmp_path / "toy"
    folder.mkdir()
    for method, acc in [("random", 0.5), ("histodd", 0.75)]:
        (folder / f"{method}_ipc10.json").write_text(json.dumps(audited(method, acc, 0.4)))
    (folder / "dm_ipc10.json").write_text(json.dumps(result("dm", 0.6)))  # not audited: left out
    points = tables.frontier(folder, tmp_path / "f.png")
    assert [(p["method"], p["memorised"], p["acc"]) for p in points] == [
        ("histodd", 1.0, 0.75), ("random", 1.0, 0.5)]
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
