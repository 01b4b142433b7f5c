"""Rule train_latent_classifier: HistoDiffusion's time-dependent latent classifier."""
import torch

from histodistill.generate.histodiffusion import train_latent_classifier
from histodistill.logs import rule_logging

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    torch.set_num_threads(sm.threads)
    train_latent_classifier(sm.input.store, sm.input.autoencoder, sm.output[0],
                            cfg=sm.params.classifier, schedule_cfg=sm.params.schedule,
                            seed=sm.params.seed, checkpoint=sm.params.checkpoint,
                            checkpoint_every=sm.resources.checkpoint_every,
                            cache_mb=sm.resources.cache_mb)
