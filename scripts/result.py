"""Rule result: join a distilled set's evaluation sections into its result file."""
from histodistill.logs import rule_logging
from histodistill.results import assemble

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    assemble(dict(sm.input.items()), sm.output[0])
