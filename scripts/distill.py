"""Rule distill: run one distillation method and write the distilled set. A tuned method runs
with its chosen candidate's settings; at the seed its candidates were distilled with, the chosen
candidate's set is that set, and is taken as it is."""
import json

import torch

from histodistill.config import with_candidate
from histodistill.distill.run import distill
from histodistill.distilled import adopt
from histodistill.logs import rule_logging

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    torch.set_num_threads(sm.threads)
    cfg = {**sm.params.cfg, "checkpoint_every": sm.resources.checkpoint_every}  # not a param: no rerun
    choice = json.loads(open(sm.input.choice).read()) if sm.input.get("choice") else None
    if choice is not None:
        cfg = with_candidate(cfg, choice["overrides"], sm.wildcards.method)
    if choice is not None and sm.params.seed == sm.params.tuned_seed:
        stem = f"{sm.params.candidate}{choice['choice']}"
        adopt({"zarr": f"{stem}.zarr", "grid": f"{stem}.png", "cost": f"{stem}_cost.json"},
              {"zarr": sm.output.zarr, "grid": sm.output.grid, "cost": sm.output.cost},
              {"tuning": choice})
    else:
        distill(sm.input.store, sm.input.template, sm.input.get("pool"), sm.wildcards.method,
                int(sm.wildcards.ipc), cfg, sm.params.seed, sm.output.zarr, sm.output.grid,
                sm.output.cost, sm.params.checkpoint, sm.resources.cache_mb,
                sm.params.max_per_class, experts=sm.input.get("experts"),
                autoencoder=sm.input.get("autoencoder"),
                extra_cost={"tuning": choice} if choice else None)
