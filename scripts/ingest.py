"""Rule ingest: bring a pre-tiled dataset into the patch-store layout."""
from histodistill.data.ingest import ingest_dataset
from histodistill.logs import rule_logging

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    ingest_dataset(sm.params.name, sm.params.dataset, sm.output[0])
