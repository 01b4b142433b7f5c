"""Rule seeds: a method's figures over its distillation seeds."""
from histodistill.distill.tuning import seed_summary
from histodistill.logs import rule_logging

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    seed_summary(list(sm.input), sm.params.seeds, sm.output[0])
