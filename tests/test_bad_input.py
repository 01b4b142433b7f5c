"""Bad input never passes silently (issue 7): each case gets one error naming the stage and the
file or config key, and leaves no partial output."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from histodistill import config

CONFIG = yaml.safe_load((Path(__file__).resolve().parent.parent / "config.yaml").read_text())


@pytest.mark.parametrize("section, override, message", [
    ("distill", {"methods": {"histodd": {"outer_loops": 3}}},
     r"'datasets.demo.distill.methods.histodd.outer_loops' is not recognised; allowed keys here: \['alpha'"),
    ("distill", {"methods": {"histo_dd": {}}},
     r"'datasets.demo.distill.methods' = 'histo_dd' is not allowed; choose one of \['histodd'"),
    ("evaluate", {"augment": {"ops": ["shear"]}},
     r"'datasets.demo.evaluate.augment.ops.0' = 'shear' is not allowed"),
    ("evaluate", {"archz": ["convnet"]},
     r"'datasets.demo.evaluate.archz' is not recognised; allowed keys here: \['arch_kwargs'"),
    ("evaluate", {"full": {"epoch": 1}},
     r"'datasets.demo.evaluate.full.epoch' is not recognised; allowed keys here: \['batch'"),
    ("tiling", {"patchsize": 64},
     r"'datasets.demo.tiling.patchsize' is not recognised; allowed keys here: \['default_mpp'"),
])
def test_dataset_override_typos_fail_at_load(section, override, message):
    cfg = copy.deepcopy(CONFIG)
    cfg["datasets"]["demo"][section] = override
    with pytest.raises(config.ConfigError, match=message):
        config.validate(cfg)


def test_dataset_overrides_get_no_schema_defaults():
    cfg = copy.deepcopy(CONFIG)
    cfg["distill"]["pool"] = {"net": "resnet18"}
    cfg["datasets"]["demo"]["distill"] = {"pool": {"size": 2}}
    cfg = config.validate(cfg)
    assert cfg["datasets"]["demo"]["distill"] == {"pool": {"size": 2}}
    pool = config.section(cfg, "demo", "distill")["pool"]
    assert (pool["net"], pool["size"]) == ("resnet18", 2)  # the global choice survives
