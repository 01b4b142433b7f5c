"""Rules tune_candidate and study_set: distil one declared variant of a method (a tuning
candidate, a study set) and evaluate it on val."""
import torch

from histodistill.distill.run import distill
from histodistill.evaluate import evaluate_candidate
from histodistill.logs import rule_logging

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    torch.set_num_threads(sm.threads)
    cfg = {**sm.params.cfg, "checkpoint_every": sm.resources.checkpoint_every}  # not a param: no rerun
    distill(sm.wildcards.method, int(sm.wildcards.ipc), cfg, sm.params.seed,
            {"zarr": sm.output.zarr, "grid": sm.output.grid, "cost": sm.output.cost},
            store_path=sm.input.store, template_path=sm.input.template,
            pool_path=sm.input.get("pool"), checkpoint=sm.params.checkpoint,
            cache_mb=sm.resources.cache_mb, max_per_class=sm.params.max_per_class,
            experts=sm.input.get("experts"), autoencoder=sm.input.get("autoencoder"),
            keep_diverged=True)
    evaluate = {**sm.params.evaluate, "cache_mb": sm.resources.cache_mb}
    evaluate_candidate(sm.output.zarr, sm.output.cost, store_path=sm.input.store,
                       template_path=sm.input.template, evaluate=evaluate,
                       overrides=sm.params.overrides, out=sm.output.json)
