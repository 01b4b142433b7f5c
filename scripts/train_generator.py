"""Rule train_generator: U-ViT latent diffusion, class-conditional (cond) or unconditional."""
import torch

from histodistill.generate.data import pooled
from histodistill.generate.generator import train_generator
from histodistill.logs import rule_logging

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    torch.set_num_threads(sm.threads)
    train_generator(sm.input.store, sm.input.autoencoder, sm.output[0], cfg=sm.params.generator,
                    mode=sm.wildcards.mode, seed=sm.params.seed,
                    pretrain=pooled(sm.input.pretrain), checkpoint=sm.params.checkpoint,
                    checkpoint_every=sm.resources.checkpoint_every,
                    cache_mb=sm.resources.cache_mb)
