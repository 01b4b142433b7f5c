"""Rule pretrain_pool: train Histo-DD's pool of networks on the real data."""
import torch

from histodistill.distill.run import pretrain_pool
from histodistill.logs import rule_logging

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    torch.set_num_threads(sm.threads)
    pretrain_pool(sm.input.store, sm.input.template, sm.output[0], cfg=sm.params.pool,
                  seed=sm.params.seed, cache_mb=sm.resources.cache_mb,
                  max_per_class=sm.params.max_per_class)
