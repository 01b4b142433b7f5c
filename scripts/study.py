"""Rule study: a study's summary and figure file from its sets' validation results."""
from histodistill.logs import rule_logging
from histodistill.studies import write_study

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    write_study(sm.wildcards.study, list(sm.input), sm.output.json, sm.output.figures)
