"""Rule train_autoencoder: LDM's KL autoencoder on the training split and pooled stores."""
import torch

from histodistill.generate.autoencoder import train_autoencoder
from histodistill.generate.data import pooled
from histodistill.logs import rule_logging

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    torch.set_num_threads(sm.threads)
    train_autoencoder(sm.input.store, sm.output[0], sm.params.autoencoder, seed=sm.params.seed,
                      pretrain=pooled(sm.input.pretrain), checkpoint=sm.params.checkpoint,
                      checkpoint_every=sm.resources.checkpoint_every,
                      cache_mb=sm.resources.cache_mb)
