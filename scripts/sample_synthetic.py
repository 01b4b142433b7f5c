"""Rule sample_synthetic: M images per class from a generator into a patch store."""
import torch

from histodistill.generate.sample import sample_synthetic
from histodistill.logs import rule_logging

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    torch.set_num_threads(sm.threads)
    files = {k: v for k, v in sm.input.items()}
    sample_synthetic(sm.wildcards.generator, files, sm.output[0], cfg=sm.params.sampling,
                     seed=sm.params.seed, per_class=sm.params.per_class, batch=sm.params.batch)
