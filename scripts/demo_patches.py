"""Rule demo_patches: render the synthetic pre-tiled patch set."""
from histodistill.logs import rule_logging
from histodistill.synth.patches import PatchDemoSpec, make_patch_demo

with rule_logging(snakemake.log[0]):  # noqa: F821 (snakemake injects this object)
    make_patch_demo(snakemake.output[0], PatchDemoSpec.from_config(snakemake.params.spec))  # noqa: F821
