"""Rule transfer: cross-centre transfer of a patch classifier and a MIL model, both directions."""
import torch

from histodistill.logs import rule_logging
from histodistill.mil.transfer import transfer

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    torch.set_num_threads(sm.threads)
    transfer(sm.input.store, sm.input.template, sm.input.distilled, sm.input.real,
             sm.input.synthetic, sm.params.cfg, sm.wildcards.dataset, sm.wildcards.method,
             int(sm.wildcards.ipc), sm.output[0], sm.resources.cache_mb)
