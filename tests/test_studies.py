"""Method studies: their variants are settings of catalogued methods, their summary's figures
are known answers, and a study is a tracked target whose sets Snakemake plans per variant and
seed (evaluated on val, never on test)."""

from __future__ import annotations

import pytest

from conftest import ROOT, planned_jobs, snakemake, tiny_config
from histodistill import catalogue, config, studies


def test_every_variant_is_a_catalogued_method_with_known_settings():
    cfg = config.load(ROOT / "config.yaml", *config.overlays("demo_patches"))
    for name, study in studies.STUDIES.items():
        assert study.reference in study.variants, name
        for variant, v in study.variants.items():
            assert v.method in catalogue.names("distill"), (name, variant)
            settings = config.method_config(cfg, "demo_patches", v.method, study.ipc)
            config.with_candidate(settings, v.overrides, v.method)  # an unknown key raises
    # the ablation knobs default to the published methods
    assert config.method_config(cfg, "demo_patches", "ptm", 10)["start_window"] == 0
    assert config.method_config(cfg, "demo_patches", "slfd", 10)["learn_shift"] is True


def result(acc: float, std: float, seed: int, saturated: float = 0.0, cross: float | None = None
           ) -> dict:
    r = {"patch": {"convnet": {"acc": {"mean": acc, "std": std}}}, "config": {"seed": seed},
         "saturated_fraction": saturated, "distill": {"seconds": 10.0}}
    if cross is not None:
        r["cross_arch"] = {"acc": {"mean": cross}}
    return r


def test_summary_figures_are_means_over_seeds_and_gains_over_the_reference():
    summary, figures = studies.summarise("latent_distill", {
        "glad": [result(0.60, 0.02, 0, cross=0.50), result(0.62, 0.04, 1, cross=0.52)],
        "slfd": [result(0.55, 0.01, 0, 0.1, cross=0.45), result(0.57, 0.03, 1, 0.3, cross=0.47)],
    })
    assert summary["glad"]["convnet"]["acc"] == pytest.approx(61.0)
    assert summary["glad"]["convnet"]["seed_std"] == pytest.approx(1.0)
    assert summary["slfd"]["convnet"]["run_std"] == pytest.approx(2.0)
    assert summary["slfd"]["seeds"] == [0, 1]
    lines = dict(f.split(": ") for f in figures)
    assert lines["slfd_convnet_gain_over_glad"] == "-5.0"
    assert lines["slfd_cross_arch_gain_over_glad"] == "-5.0"
    assert lines["slfd_saturated_pct"] == "20.00"
    assert "glad_convnet_gain_over_glad" not in lines


def test_a_study_under_both_protocols_compares_variants_under_the_same_one():
    def both(acc_own: float, acc_other: float, own_norm: bool) -> dict:
        r = {**result(acc_own, 0.01, 0), "stain_norm": own_norm}
        r["other_protocol"] = {"stain_norm": not own_norm,
                               "patch": {"convnet": {"acc": {"mean": acc_other, "std": 0.03}}}}
        return r

    # Histo-DD's own protocol normalises, random's does not
    summary, figures = studies.summarise("histodd_ablation", {
        "histodd": [both(0.58, 0.62, True)], "random": [both(0.59, 0.54, False)]})
    lines = dict(f.split(": ") for f in figures)
    assert lines["histodd_convnet_gain_over_random"] == "-1.0"        # each under its own
    assert lines["histodd_convnet_stain_off_gain_over_random"] == "3.0"
    assert lines["histodd_convnet_stain_on_gain_over_random"] == "4.0"
    assert summary["histodd"]["convnet_stain_off"]["run_std"] == pytest.approx(3.0)


def test_unknown_study_is_named():
    with pytest.raises(ValueError, match="unknown study 'nope'.*latent_distill"):
        studies.get("nope")


@pytest.mark.slow
def test_a_study_plans_one_set_per_variant_and_seed(tmp_path):
    tiny_config(tmp_path / "config.yaml")
    study = studies.STUDIES["ptm_ablation"]
    proc = snakemake(tmp_path, "-n", "--", "results/demo/studies/ptm_ablation.json")
    jobs = planned_jobs(proc)
    assert jobs["study_set"] == len(study.variants) * study.seeds and jobs["study"] == 1
    assert "evaluate" not in jobs and "tune" not in jobs  # val only: no test-split evaluation
    # a set the study does not declare is refused by name
    proc = snakemake(tmp_path, "-n", "--", "results/demo/studies/ptm_ablation/mtt_ipc10_retrain0_s0.json",
                     check=False)
    assert proc.returncode != 0 and "ptm_ablation has no set mtt_ipc10_retrain0" in proc.stdout + proc.stderr
