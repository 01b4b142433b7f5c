"""Rule buffer_experts: train expert networks and store their parameter trajectories."""
import torch

from histodistill.logs import rule_logging
from histodistill.trajectories.buffer import buffer_experts

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    torch.set_num_threads(sm.threads)
    cfg = sm.params.trajectories
    buffer_experts(sm.input[0], sm.output[0], cfg, seed=cfg["seed"], cache_mb=sm.resources.cache_mb)
