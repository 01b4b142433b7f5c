"""Rule tile_slides: tile one batch of slides into one store per slide (resumable)."""
from histodistill.logs import rule_logging
from histodistill.slides.tiling import tile_slides

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    tile_slides(sm.params.rows, sm.params.tiling, sm.output[0], class_names=sm.params.classes,
                threads=sm.threads)
