"""Rule full_mil: one MIL model trained on the full real bags, tested on the real test slides."""
import torch

from histodistill.data.store import PatchStore
from histodistill.logs import rule_logging
from histodistill.mil.train import full_mil

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    torch.set_num_threads(sm.threads)
    full_mil(sm.input.bags, PatchStore(sm.input.store).class_names, sm.wildcards.model,
             cfg=sm.params.settings, runs=sm.params.runs, seed=sm.params.seed, out=sm.output[0],
             cache_mb=sm.resources.cache_mb)
