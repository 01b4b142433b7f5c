"""Rule tile: tile every slide of the slide table into the dataset's patch store."""
from histodistill.cohort import read_table
from histodistill.logs import rule_logging
from histodistill.tiling import class_names, tile_cohort

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    rows = read_table(sm.input[0])
    cfg = {**sm.params.tiling, "threads": sm.threads}
    tile_cohort(rows, cfg, sm.output[0], class_names(rows, cfg, sm.params.classes),
                attrs={"dataset": sm.wildcards.dataset})
