"""Rule tile: gather the per-slide stores of a WSI dataset into its patch store."""
from histodistill.logs import rule_logging
from histodistill.slides.tiling import gather

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    gather(sm.params.rows, sm.input, sm.params.tiling, out=sm.output[0],
           class_names=sm.params.classes, attrs={"dataset": sm.wildcards.dataset})
