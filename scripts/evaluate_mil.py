"""Rule evaluate_mil: the MIL models on synthetic bags against full bags (the `slide` section)."""
import torch

from histodistill.data.store import PatchStore
from histodistill.logs import rule_logging
from histodistill.mil.train import evaluate_mil

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    torch.set_num_threads(sm.threads)
    full = dict(zip(sm.params.mil["models"], sm.input.full))
    evaluate_mil(sm.input.synthetic, sm.input.real, full=full,
                 class_names=PatchStore(sm.input.store).class_names, settings=sm.params.mil,
                 out=sm.output[0], cache_mb=sm.resources.cache_mb)
