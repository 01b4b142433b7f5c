"""The Snakemake workflow end to end on a tiny demo config: outputs, reruns, profiles, errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import planned_jobs, snakemake, tiny_config
from histodistill.data.store import PatchStore
from histodistill.summary import summarise

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_demo_target_builds_every_stage(built):
    result = json.loads((built / "results/demo/histodd_ipc10.json").read_text())
    assert {"dataset", "method", "ipc", "patch", "full", "distill", "config", "versions",
            "saturated_fraction"} <= set(result)
    assert 0 <= result["saturated_fraction"] < 0.05
    assert {"sensitivity", "specificity"} <= set(result["patch"]["convnet"])
    assert result["method"] == "histodd" and result["ipc"] == 10
    assert set(result["patch"]["convnet"]) >= {"acc", "f1", "auc", "epoch_time_s"}
    assert len(result["patch"]["convnet"]["acc"]["runs"]) == 2
    assert result["full"]["convnet"]["acc"]["mean"] > 0 and result["distill"]["seconds"] > 0
    privacy = result["privacy"]  # joined from rule privacy_audit
    assert privacy["heldout_split"] == "test" and privacy["encoder"] == "supervised"
    assert set(privacy["spaces"]) == {"pixel", "feature"} and privacy["attack_members"] == "sources"
    assert (built / "results/demo/privacy/histodd_ipc10_pairs.png").stat().st_size > 0
    coreset = json.loads((built / "results/demo/random_ipc10.json").read_text())["privacy"]
    assert coreset["memorised"] == 1.0 and coreset["attack_auc"] == 1.0  # real patches, shared
    assert (built / "results/demo/distilled/histodd_ipc10.png").stat().st_size > 0
    assert not (built / "results/demo/distilled/histodd_ipc10.ckpt").exists()
    store = PatchStore(built / "results/demo/patches.zarr")
    assert len(store) > 0 and store.attrs["class_names"] == ["normal", "tumor"]
    assert len(store.attrs["channel_mean"]) == 3 and min(store.attrs["channel_std"]) > 0
    template = json.loads((built / "results/demo/stain/template.json").read_text())
    assert len(template["stain_matrix"]) == 2 and template["split"] == "train"
    assert (built / "results/demo/stain/template.png").stat().st_size > 0
    assert "patches" in (built / "logs/tile/demo.log").read_text()
    assert (built / "benchmarks/tile/demo.tsv").exists()
    assert planned_jobs(snakemake(built, "-n", "demo")) == {}
    # `make demo`'s target: the patch level alone, no slide level, no privacy audit
    patch_level = planned_jobs(snakemake(built, "-n", "--forceall", "demo_patch_level"))
    assert {"tile", "distill", "evaluate", "full_train"} <= set(patch_level)
    assert not {"privacy_audit", "result", "full_mil", "evaluate_mil", "train_encoder"} & set(patch_level)
    text = summarise(built / "results/demo")
    assert f"{len(store)} patches of 32 px" in text and "template patch" in text
    assert "histodd_ipc10.json" in text and "random_ipc10.json" in text
    assert "distilled/histodd_ipc10.png" in text and "convnet acc" in text
    assert "privacy/histodd_ipc10_pairs.png" in text and "attack AUC" in text


def test_slide_section_holds_every_model_beside_its_cached_full_bags(built):
    import h5py

    slide = json.loads((built / "results/demo/histodd_ipc10.json").read_text())["slide"]
    assert set(slide["models"]) == {"clam_sb", "dsmil"}
    for name, m in slide["models"].items():
        assert len(m["synthetic"]["acc"]["runs"]) == 1 and 0 <= m["synthetic"]["auc"]["mean"] <= 1
        cached = json.loads((built / f"results/demo/slide_full/supervised/{name}.json").read_text())
        assert m["full"]["acc"] == cached["acc"] and m["full"]["epochs"] == 2
    syn, full = slide["bags"]["synthetic"], slide["bags"]["full"]
    assert syn["slides"] == full["slides"] == 2 and syn["patches"] <= 3 * 10  # m per class per slide
    store = PatchStore(built / "results/demo/patches.zarr")
    assert full["patches"] == int((store.array("split") == 0).sum()) and slide["storage_ratio"] < 1
    for bag in (built / "results/demo/bags/supervised").glob("*/*.h5"):
        with h5py.File(bag, "r") as f:
            assert f["features"].shape[0] == f["coords"].shape[0] > 0
    assert "slides    clam_sb" in summarise(built / "results/demo")


def test_slide_stage_refuses_at_dag_time_what_it_cannot_do(built):
    proc = snakemake(built, "-n", "results/demo/slide_eval/herding_ipc10.json", check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "[distill_slides] distillation method 'herding' cannot run per slide" in out
    proc = snakemake(built, "-n", "results/demo/transfer_histodd_ipc10.json", check=False)
    assert proc.returncode != 0  # the tiny demo's two training slides are both of centre 0
    assert "cross-centre transfer needs training slides of two or more centres" in proc.stdout + proc.stderr


def test_editing_a_section_reruns_only_its_stage_and_below(built):
    below_stain = {"distill": 3, "full_train": 1, "evaluate": 3, "privacy_audit": 3, "result": 3,
                   "demo": 1,  # histodd, dm, random
                   "pretrain_pool": 1,  # Histo-DD's pool trains under stain normalisation
                   "distill_slides": 3, "extract_features": 3, "evaluate_mil": 3}  # synthetic bags
    try:
        tiny_config(built / "config.yaml", stain={"beta": 0.2})
        assert planned_jobs(snakemake(built, "-n", "demo")) == {"stain_template": 1, **below_stain}
        tiny_config(built / "config.yaml", tiling={"tissue_threshold": 0.6})
        assert planned_jobs(snakemake(built, "-n", "demo")) == {
            "tile_slides": 1, "tile": 1, "stain_template": 1, **below_stain,  # ten slides a job
            "train_encoder": 1, "extract_features": 4, "full_mil": 2}
        tiny_config(built / "config.yaml", evaluate={"seed": 3})
        assert planned_jobs(snakemake(built, "-n", "demo")) == {"full_train": 1, "evaluate": 3, "result": 3, "demo": 1}
        tiny_config(built / "config.yaml", privacy={"percentile": 10})
        assert planned_jobs(snakemake(built, "-n", "demo")) == {"privacy_audit": 3, "result": 3, "demo": 1}
        tiny_config(built / "config.yaml", privacy={"batch": 7})  # block size: a resource
        assert planned_jobs(snakemake(built, "-n", "demo")) == {}
    finally:
        tiny_config(built / "config.yaml")


def job_resources(proc: subprocess.CompletedProcess) -> list[tuple[str, dict[str, str]]]:
    """(rule, resources) of every job a dry run prints."""
    text = proc.stdout + proc.stderr
    jobs = re.findall(r"^(?:local)?rule (\w+):\n(?:    .*\n)*?    resources: (.*)$", text, re.M)
    return [(rule, dict(kv.split("=", 1) for kv in res.split(", "))) for rule, res in jobs]


GPU_RULES = {"pretrain_pool", "distill", "full_train", "evaluate", "train_encoder", "privacy_audit",
             "distill_slides", "extract_features", "full_mil", "evaluate_mil"}
AFTER_COHORT = {"distill_slides"}  # planned from the slide table: not in a dry run before it exists


def test_slurm_profile_dry_runs_from_the_repo_root(built):
    proc = snakemake(built, "--profile", "slurm", "-n", "--forceall", "demo")
    text = proc.stdout + proc.stderr
    assert "Using profiles slurm and workflow specific profile profiles/default" in text
    jobs = dict(job_resources(proc))
    assert jobs["distill"]["mem_mb"] == "32000" and jobs["distill"]["runtime"] == "2880"
    assert {r for r, res in jobs.items() if res.get("gpu") == "1"} == GPU_RULES - AFTER_COHORT
    assert planned_jobs(proc)["tile"] == 1


def test_slurm_site_settings_and_rule_overrides_reach_the_jobs(tmp_path, small_cohort):
    """The commented examples of slurm/config.yaml, switched on, reach a camelyon16 dry run;
    no job names a partition (the partition file routes them) and none asks for more than 48 h."""
    profile = yaml.safe_load((ROOT / "slurm" / "config.yaml").read_text())
    profile["default-resources"] = {"slurm_account": "mylab"}
    profile["set-resources"] = {"distill": {"gpu_model": "a100"},
                                "full_train": {"gpu": 0, "cpus_per_task": 16}}
    shutil.copytree(ROOT / "slurm", tmp_path / "site")
    (tmp_path / "site" / "config.yaml").write_text(yaml.safe_dump(profile))
    tiny_config(tmp_path / "config.yaml")
    proc = snakemake(tmp_path, "--profile", str(tmp_path / "site"), "-n",
                     "results/camelyon16/histodd_ipc10.json", "--config",
                     f"datasets={{camelyon16: {{root: {small_cohort}, "
                     "centre_split: {normal: 1, tumor: 1}}}")
    jobs = job_resources(proc)
    assert {rule for rule, _ in jobs} >= (GPU_RULES - AFTER_COHORT) | {"stain_template"}
    for rule, res in jobs:
        assert res["slurm_account"] == "mylab" and "slurm_partition" not in res, rule
        assert res.get("gpu", "0") == ("1" if rule in GPU_RULES - {"full_train"} else "0"), rule
        assert int(res["runtime"]) <= 2880, rule
    distill = dict(jobs)["distill"]
    assert distill["gpu_model"] == "a100" and distill["mem_mb"] == "32000"  # rest kept
    assert dict(jobs)["full_train"]["cpus_per_task"] == "16"


def test_the_partition_file_is_the_one_gpu_routing_setting():
    profile = yaml.safe_load((ROOT / "slurm" / "config.yaml").read_text())
    parts = yaml.safe_load((ROOT / "slurm" / profile["slurm-partition-config"]).read_text())["partitions"]
    assert parts["gpu"]["max_gpu"] >= 1 and parts["cpu"]["max_gpu"] == 0
    assert "slurm_partition" not in profile.get("default-resources", {})
    assert (ROOT / "slurm" / profile["snakefile"]).resolve() == ROOT / "Snakefile"


def test_a_retry_gets_more_memory_and_runtime(tmp_path):
    tiny_config(tmp_path / "config.yaml")
    (tmp_path / "results/demo/patches.zarr").mkdir(parents=True)  # not a store: the job fails
    proc = snakemake(tmp_path, "--cores", "1", "--retries", "1", "--allowed-rules",
                     "stain_template", "--", "results/demo/stain/template.json", check=False)
    assert proc.returncode != 0
    attempts = [res for rule, res in job_resources(proc) if rule == "stain_template"]
    assert [(r["mem_mb"], r["runtime"]) for r in attempts] == [("8000", "60"), ("16000", "120")]
    assert not (tmp_path / "results/demo/stain/template.json").exists()


def test_bad_config_key_fails_with_one_clear_message(tmp_path):
    tiny_config(tmp_path / "config.yaml", tiling={"magnifcation": 5})
    proc = snakemake(tmp_path, "-n", "demo", check=False)
    assert proc.returncode != 0
    assert "config key 'tiling.magnifcation' is not recognised" in proc.stdout + proc.stderr


def test_a_demo_target_without_its_overlay_stops_with_one_line(tmp_path):
    """config.yaml alone configures no demo: `demo` and `demo_pretiled` stop before the DAG is
    built with one line naming the overlay to add; with it, the demo's DAG builds."""
    shipped = str(ROOT / "config.yaml")
    for target, overlay in (("demo", "demo.yaml"), ("demo_pretiled", "demo_patches.yaml")):
        proc = snakemake(tmp_path, "-n", target, "--configfile", shipped, check=False)
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0
        lines = [line for line in text.splitlines() if "is not configured" in line]
        assert len(lines) == 1 and f"`--configfile {ROOT / 'configs' / overlay}`" in lines[0], text
        assert "Traceback" not in text and 'File "' not in text, text
    proc = snakemake(tmp_path, "-n", "demo", "--configfile", shipped, str(ROOT / "configs/demo.yaml"))
    assert planned_jobs(proc)["demo_cohort"] == 1


def test_missing_dataset_root_names_the_key(tmp_path):
    tiny_config(tmp_path / "config.yaml")
    proc = snakemake(tmp_path, "-n", "results/camelyon16/stain/template.json", check=False)
    assert proc.returncode != 0
    assert "datasets.camelyon16.root: is not set" in proc.stdout + proc.stderr


def test_each_method_family_builds(built):
    """One method per rule path beyond the demo target's histodd and random: distribution
    matching with its per-slide sets, a trained coreset, and both methods of the expert buffer.
    dc, dsa and herding take the same rules and scripts as histodd, dm and forgetting (the
    library tests run each of them, per slide too)."""
    from histodistill import catalogue

    methods = ("dm", "forgetting", "mtt", "ptm")
    snakemake(built, "--cores", "2", *(f"results/demo/{m}_ipc2.json" for m in methods))
    for method in methods:
        result = json.loads((built / f"results/demo/{method}_ipc2.json").read_text())
        assert result["ipc"] == 2 and 0 <= result["patch"]["convnet"]["acc"]["mean"] <= 1
        assert ("slide" in result) == (not catalogue.get(method).not_per_slide)
        assert "privacy" in result


def test_package_builds_and_a_coreset_is_refused(built):
    from histodistill.privacy.package import verify_package

    snakemake(built, "--cores", "1", "results/demo/histodd_ipc10.share")
    share = built / "results/demo/histodd_ipc10.share"
    verify_package(share)
    sheet = (share / "DATASHEET.md").read_text()
    assert "## Privacy audit" in sheet and "Synthetic demo cohort" in sheet
    assert (built / "results/demo/report/histodd_ipc10_datasheet.html").stat().st_size > 0
    proc = snakemake(built, "--cores", "1", "results/demo/random_ipc10.share", check=False)
    assert proc.returncode != 0
    assert "random_ipc10 is a coreset" in proc.stdout + proc.stderr
    assert "allow_real_patches: true" in proc.stdout + proc.stderr
    assert not (built / "results/demo/random_ipc10.share").exists()
    try:  # the package's texts rerun the package alone
        tiny_config(built / "config.yaml", privacy={"package": {"licence": "CC-BY-4.0"}})
        assert planned_jobs(snakemake(built, "-n", "results/demo/histodd_ipc10.share")) == {"package": 1}
        assert planned_jobs(snakemake(built, "-n", "demo")) == {}
    finally:
        tiny_config(built / "config.yaml")


def test_missing_per_ipc_entry_names_the_key(tmp_path):
    tiny_config(tmp_path / "config.yaml")
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del cfg["datasets"]["demo"]["distill"]["methods"]["dc"]["outer_loop"]  # back to {ipc: K}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "-n", "results/demo/dc_ipc7.json", check=False)
    assert proc.returncode != 0
    assert "'distill.methods.dc.outer_loop' has no entry for ipc=7" in proc.stdout + proc.stderr
