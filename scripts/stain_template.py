"""Rule stain_template: choose the Macenko template patch and save its stain parameters."""
from histodistill.logs import rule_logging
from histodistill.stain import build_template

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    build_template(sm.input[0], sm.output.json, sm.output.png, **sm.params.stain)
