"""Rule full_train: the full-data upper bound of one architecture."""
import torch

from histodistill.evaluate import full_train
from histodistill.logs import rule_logging

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    torch.set_num_threads(sm.threads)
    cfg = {**sm.params.evaluate, "cache_mb": sm.resources.cache_mb}  # not a param: no rerun
    full_train(sm.input.store, sm.input.template, sm.wildcards.arch, cfg=cfg, out=sm.output[0],
               checkpoint=sm.params.checkpoint)
