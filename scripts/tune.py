"""Rule tune: choose a method's setting, the candidate with the best validation accuracy."""
from histodistill.distill.tuning import choose
from histodistill.logs import rule_logging

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    choose(list(sm.input), sm.output[0], sm.params.max_saturated)
