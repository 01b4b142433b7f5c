"""Rule demo_cohort: render the synthetic demo cohort."""
from histodistill.logs import rule_logging
from histodistill.synth.cohort import DemoSpec, make_cohort

with rule_logging(snakemake.log[0]):  # noqa: F821 (snakemake injects this object)
    make_cohort(snakemake.output[0], DemoSpec.from_config(snakemake.params.spec))  # noqa: F821
