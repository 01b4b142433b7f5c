# histodistill: distil a histopathology WSI cohort into a small synthetic patch set.
#   snakemake --cores 2 demo --configfile configs/demo.yaml       (the embedded demo cohort)
#   snakemake --profile slurm results/camelyon16/histodd_ipc10.json   (on a SLURM cluster)
# config.yaml holds what a user edits; the defaults are in workflow/schemas/config.schema.yaml,
# the demos' and PCam's settings in overlays, configs/<dataset>.yaml, given with --configfile.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/tile_inputs.smk"
include: "workflow/rules/tile.smk"
include: "workflow/rules/stain.smk"
include: "workflow/rules/trajectory_inputs.smk"
include: "workflow/rules/trajectories.smk"
include: "workflow/rules/encoders.smk"
include: "workflow/rules/distill_inputs.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/mil_inputs.smk"
include: "workflow/rules/mil.smk"
include: "workflow/rules/result.smk"
include: "workflow/rules/privacy.smk"
include: "workflow/rules/generate_inputs.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/select_inputs.smk"
include: "workflow/rules/select.smk"
include: "workflow/rules/studies_inputs.smk"
include: "workflow/rules/studies.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        profile_inputs("all", [config["dataset"]], final_targets(config["dataset"])),


rule demo:
    input:
        profile_inputs("demo", ["demo"], final_targets("demo")),


rule demo_patch_level:
    """The demo's patch-level table alone (tiling, stain template, pool, distillation, evaluation,
    the full-data bound): what `make demo` builds; `demo` adds the slide level and privacy.
    """
    input:
        profile_inputs(
            "demo_patch_level", ["demo"], final_targets("demo", "patch_eval/")
        ),


rule demo_pretiled:
    input:
        profile_inputs(
            "demo_pretiled",
            ["demo_patches"],
            [
                f"results/demo_patches/{m}_ipc10.json"
                for m in ("histodd", "dsa", "dm", "random")
            ],
        ),


rule demo_generate:
    input:
        profile_inputs(
            "demo_generate",
            ["demo", "demo_patches"],
            [
                f"results/{d}/generate/{g}_quality.json"
                for d in ("demo", "demo_patches")
                for g in ("uvit", "histodiffusion")
            ],
        ),


rule demo_select:
    input:
        profile_inputs(
            "demo_select",
            ["demo", "demo_patches"],
            [
                f"results/{d}/{m}_ipc10.json"
                for d in ("demo", "demo_patches")
                for m in ("infodist", "synrandom", "centroid", "glad", "slfd")
            ]
            + ["results/demo_patches/augment_centroid.json"],
        ),
