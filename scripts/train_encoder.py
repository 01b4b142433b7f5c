"""Rule train_encoder: train (or load) one feature encoder on the real training patches."""
import torch

from histodistill.encoders import train_encoder
from histodistill.logs import rule_logging

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    torch.set_num_threads(sm.threads)
    train_encoder(sm.input.store, sm.output[0], sm.params.encoder, cache_mb=sm.resources.cache_mb,
                  checkpoint=sm.params.checkpoint,
                  weights=sm.input.weights[0] if sm.input.weights else None)
