"""Rule cohort: write the slide table of a WSI dataset."""
from histodistill.cohort import build_table, write_table
from histodistill.logs import rule_logging

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    write_table(build_table(sm.params.name, sm.params.dataset), sm.output[0])
