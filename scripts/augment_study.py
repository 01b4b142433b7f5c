"""Rule augment_study: a small real subset plus selected synthetic images at several ratios."""
import torch

from histodistill.logs import rule_logging
from histodistill.select.study import augment_study

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    torch.set_num_threads(sm.threads)
    augment_study(sm.wildcards.dataset, sm.wildcards.method, sel_cfg=sm.params.cfg,
                  cfg=sm.params.study, seed=sm.params.seed, store_path=sm.input.store,
                  pool_path=sm.input.pool, encoder_path=sm.input.encoder,
                  template_path=sm.input.template, out=sm.output[0],
                  cache_mb=sm.resources.cache_mb)
