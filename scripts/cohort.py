"""Rule cohort: write the checked slide table of a WSI dataset."""
from histodistill.slides.cohort import build_table, write_table
from histodistill.logs import rule_logging
from histodistill.slides.tiling import check_cohort, class_names

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    rows = build_table(sm.params.name, sm.params.dataset)
    check_cohort(sm.params.name, rows, sm.params.tiling,
                 class_names=class_names(rows, sm.params.tiling, sm.params.dataset.get("classes")),
                 unannotated=sm.params.dataset.get("unannotated_slides", ()))
    write_table(rows, sm.output[0])
