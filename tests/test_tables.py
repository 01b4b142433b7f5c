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
    assert lines[2].startswith("| histodd | 10 | 75.0 ± 1.0") and lines[3].startswith("| random")
    assert lines[2].endswith("| 2.5 | 12 |")  # saturated %, distill seconds
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
    assert len([l for l in text.splitlines() if l.startswith("| ")]) == 2 and "test" in text
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:toy:start -->\n<!-- results:toy:end -->\n"
                      "<!-- privacy:toy:start -->\nold\n<!-- privacy:toy:end -->\n")
    tables.update_readme(readme, folder)
    assert "old" not in readme.read_text() and "0.97 [0.90, 1.00]" in readme.read_text()
    (folder / "histodd_ipc10.json").write_text(json.dumps(result("histodd", 0.7)))
    assert tables.privacy_table(folder) is None
