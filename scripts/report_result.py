"""Rule report_result: training curves and result table of one result file for the report."""
from histodistill.logs import rule_logging
from histodistill.report import report_result

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    report_result(sm.input[0], sm.output.curves, sm.output.table)
