"""Rule generator_quality: FID, precision and recall of a synthetic store; per-class grid."""
import torch

from histodistill.generate.quality import quality
from histodistill.logs import rule_logging

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    torch.set_num_threads(sm.threads)
    quality(sm.input.synthetic, sm.input.store, sm.input.encoder, cfg=sm.params.quality,
            out=sm.output.json, grid=sm.output.grid)
