"""Rule transfer: cross-centre transfer of a patch classifier and a MIL model, both directions."""
import torch

from histodistill.logs import rule_logging
from histodistill.mil.transfer import transfer

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    torch.set_num_threads(sm.threads)
    transfer(sm.input.store, sm.input.template, distilled=sm.input.distilled,
             real_bags=sm.input.real, synthetic_bags=sm.input.synthetic, cfg=sm.params.cfg,
             dataset=sm.wildcards.dataset, method=sm.wildcards.method, ipc=int(sm.wildcards.ipc),
             out=sm.output[0], cache_mb=sm.resources.cache_mb)
