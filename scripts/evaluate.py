"""Rule evaluate: train the configured architectures on a distilled set and write the result."""
import torch

from histodistill.evaluate import evaluate_distilled
from histodistill.logs import rule_logging

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    torch.set_num_threads(sm.threads)
    full = dict(zip(sm.params.evaluate["archs"], sm.input.full))
    cfg = {**sm.params.evaluate, "cache_mb": sm.resources.cache_mb}  # not a param: no rerun
    evaluate_distilled(sm.input.distilled, sm.input.cost, store_path=sm.input.store,
                       template_path=sm.input.template, full=full, cfg=cfg,
                       dataset=sm.wildcards.dataset, out=sm.output[0])
