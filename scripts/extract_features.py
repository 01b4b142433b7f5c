"""Rule extract_features: one HDF5 feature bag per slide, real or per-slide synthetic."""
import torch

from histodistill.logs import rule_logging
from histodistill.mil.bags import extract_real_bags, extract_synthetic_bags

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    torch.set_num_threads(sm.threads)
    if sm.wildcards.bags == "real":
        extract_real_bags(sm.input.store, sm.input.encoder, sm.output[0], batch=sm.resources.batch)
    else:
        extract_synthetic_bags(sm.input.distilled, sm.input.encoder, sm.output[0],
                               batch=sm.resources.batch)
