"""Rule train_generator: U-ViT latent diffusion, class-conditional (cond) or unconditional."""
import torch

from histodistill.generate.data import pooled
from histodistill.generate.generator import train_generator
from histodistill.logs import rule_logging

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    torch.set_num_threads(sm.threads)
    train_generator(sm.input.store, sm.input.autoencoder, sm.output[0], sm.params.generator,
                    sm.wildcards.mode, sm.params.seed, pooled(sm.input.pretrain),
                    sm.params.checkpoint, sm.resources.checkpoint_every, sm.resources.cache_mb)
