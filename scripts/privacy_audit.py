"""Rule privacy_audit: nearest real neighbours and membership inference for one distilled set."""
import torch

from histodistill.logs import rule_logging
from histodistill.privacy.audit import privacy_audit

sm = snakemake  # noqa: F821 (snakemake injects this object)
with rule_logging(sm.log[0]):
    torch.set_num_threads(sm.threads)
    cfg = {**sm.params.privacy, "batch": sm.resources.batch}  # block size: not a param, no rerun
    privacy_audit(sm.input.distilled, sm.input.store, sm.input.encoder[0] if sm.input.encoder else None,
                  cfg=cfg, out_json=sm.output.json, out_grid=sm.output.grid)
