"""Rule select: choose ipc images per class from a pool and write them as a distilled set."""
import torch

from histodistill.logs import rule_logging
from histodistill.select.run import select

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    torch.set_num_threads(sm.threads)
    select(sm.wildcards.method, sm.params.cfg, int(sm.wildcards.ipc), seed=sm.params.seed,
           pool_path=sm.input.pool, store_path=sm.input.store,
           encoder_path=sm.input.encoder[0] if sm.input.encoder else None,
           out_zarr=sm.output.zarr, out_png=sm.output.grid, out_json=sm.output.cost)
