"""Rule distill_slides: distil each training slide of one job separately (resumable per slide);
a tuned method runs with its candidate chosen on validation, per-slide overrides winning."""
import torch

from histodistill.distill.per_slide import distill_slides
from histodistill.distill.tuning import apply_choice, read_choice
from histodistill.logs import rule_logging

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    torch.set_num_threads(sm.threads)
    cfg = apply_choice({**sm.params.cfg, "checkpoint_every": sm.resources.checkpoint_every},
                       read_choice(sm.input.get("choice")), sm.wildcards.method,
                       keep=sm.params.per_slide)  # checkpoint_every: not a param, no rerun
    distill_slides(sm.input.store, sm.input.template, pool_path=sm.input.get("pool"),
                   method=sm.wildcards.method, ipc=int(sm.wildcards.ipc), cfg=cfg,
                   seed=sm.params.seed, slides=sm.params.slides, out=sm.output[0],
                   cache_mb=sm.resources.cache_mb)
