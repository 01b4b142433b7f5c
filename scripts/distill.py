"""Rule distill: run one distillation method and write the distilled set; a tuned method runs
with (or, at its candidates' seed, adopts the set of) its candidate chosen on validation."""
import torch

from histodistill.distill.tuning import distill_or_adopt
from histodistill.logs import rule_logging

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    torch.set_num_threads(sm.threads)
    distill_or_adopt(
        sm.wildcards.method, int(sm.wildcards.ipc),
        {**sm.params.cfg, "checkpoint_every": sm.resources.checkpoint_every},  # not a param
        sm.params.seed, {"zarr": sm.output.zarr, "grid": sm.output.grid, "cost": sm.output.cost},
        choice_path=sm.input.get("choice"), candidate_stem=sm.params.candidate,
        tuned_seed=sm.params.tuned_seed, store_path=sm.input.store, template_path=sm.input.template,
        pool_path=sm.input.get("pool"), checkpoint=sm.params.checkpoint,
        cache_mb=sm.resources.cache_mb, max_per_class=sm.params.max_per_class,
        experts=sm.input.get("experts"), autoencoder=sm.input.get("autoencoder"))
