"""Rule tile: tile every slide of the slide table into the dataset's patch store."""
from histodistill.cohort import read_table
from histodistill.logs import rule_logging
from histodistill.tiling import tile_cohort

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    rows = read_table(sm.input[0])
    classes = sm.params.classes or sorted({r["label"] for r in rows} | {sm.params.tiling["tumour_class"]})
    tile_cohort(rows, {**sm.params.tiling, "threads": sm.threads}, sm.output[0], classes,
                attrs={"dataset": sm.wildcards.dataset})
