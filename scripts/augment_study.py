"""Rule augment_study: a small real subset plus selected synthetic images at several ratios."""
import torch

from histodistill.logs import rule_logging
from histodistill.select.study import augment_study

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    torch.set_num_threads(sm.threads)
    augment_study(sm.wildcards.dataset, sm.wildcards.method, sm.params.cfg, sm.params.study,
                  sm.params.seed, sm.input.store, sm.input.pool, sm.input.encoder,
                  sm.input.template, sm.output[0], sm.resources.cache_mb)
