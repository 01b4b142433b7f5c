"""Rule package: the guard, then the shareable package of one distilled set and its datasheet."""
from histodistill.logs import rule_logging
from histodistill.privacy.package import write_package

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    write_package(sm.input.distilled, sm.input.result, sm.input.store, out=sm.output.share,
                  datasheet_html=sm.output.datasheet, settings=sm.params.package)
