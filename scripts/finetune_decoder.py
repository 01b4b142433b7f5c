"""Rule finetune_decoder: HistoDiffusion's decoder fine-tuning with an auxiliary classifier."""
import torch

from histodistill.generate.histodiffusion import finetune_decoder
from histodistill.logs import rule_logging

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    torch.set_num_threads(sm.threads)
    finetune_decoder(sm.input.store, sm.input.autoencoder, sm.output[0], cfg=sm.params.finetune,
                     seed=sm.params.seed, checkpoint=sm.params.checkpoint,
                     checkpoint_every=sm.resources.checkpoint_every,
                     cache_mb=sm.resources.cache_mb)
