"""Config validation names the bad key and the allowed values; defaults are filled."""

from __future__ import annotations

import copy

import pytest
import yaml

from histodistill import config

# config.yaml with the demo, pre-tiled demo and PCam overlays merged over it (as --configfile does)
CONFIG = config.read(config.CONFIG, *config.overlays("demo", "demo_patches", "pcam"))


def at(cfg: dict, dotted: str) -> dict:
    """The mapping at a dotted key of a config, created empty where the files leave it out (the
    schema fills its defaults)."""
    for key in dotted.split("."):
        cfg = cfg.setdefault(key, {})
    return cfg


def test_shipped_config_is_valid_and_defaults_fill_in():
    cfg = config.validate(copy.deepcopy(CONFIG))
    assert config.tiling(cfg, "demo")["patch_size"] == 32  # per-dataset override
    assert config.tiling(cfg, "camelyon16")["magnification"] == 5
    assert config.tiling(cfg, "demo")["tumour_groups"][0] == "_0"  # schema default
    minimal = config.validate({"datasets": {}})
    assert minimal["stain"] == {"io": 240, "alpha": 1, "beta": 0.15, "split": "train",
                                "ignore_clipped": True}


@pytest.mark.parametrize("edit, message", [
    (lambda c: at(c, "tiling").update(magnifcation=5),
     r"'tiling.magnifcation' is not recognised; allowed keys here: \['default_mpp'"),
    (lambda c: c["datasets"]["demo"].update(format="svs"),
     r"'datasets.demo.format' = 'svs' is not allowed; choose one of \['wsi'"),
    (lambda c: c.update(stains={}), r"'stains' is not recognised; allowed keys here: \['dataset', 'datasets', 'demo'"),
    (lambda c: at(c, "stain").update(beta=-1), r"'stain.beta' = -1: -1 is less than the minimum of 0"),
    (lambda c: c["datasets"]["demo"]["tiling"].update(patch_size="64"), r"'datasets.demo.tiling.patch_size' = '64'"),
    (lambda c: at(c, "distill.methods.mtt").update(syn_step=20),
     r"'distill.methods.mtt.syn_step' is not recognised; allowed keys here: \['augment', 'batch_syn'"),
    (lambda c: at(c, "distill.methods.ptm").update(retrain=-1),
     r"'distill.methods.ptm.retrain' = -1: -1 is less than the minimum of 0"),
    (lambda c: at(c, "distill.methods.ptm").update(sigma=0),
     r"'distill.methods.ptm.sigma' = 0"),
    (lambda c: at(c, "distill.methods.ptm").update(max_start_epoch=2),  # an mtt key
     r"'distill.methods.ptm.max_start_epoch' is not recognised"),
    (lambda c: at(c, "distill.methods.mtt").update(end_epoch=5),  # a ptm key
     r"'distill.methods.mtt.end_epoch' is not recognised"),
    (lambda c: at(c, "trajectories").update(dtype="float64"),
     r"'trajectories.dtype' = 'float64' is not allowed; choose one of \['float32', 'float16'\]"),
    (lambda c: at(c, "trajectories").update(net="resnet50"), r"'trajectories.net' = 'resnet50'"),
    (lambda c: c["datasets"]["demo"]["trajectories"].update(experts=0),
     r"'datasets.demo.trajectories.experts' = 0: 0 is less than the minimum of 1"),
    (lambda c: c["datasets"]["demo"]["distill"]["methods"]["ptm"].update(beta1=2),
     r"'datasets.demo.distill.methods.ptm.beta1' is not recognised"),
])
def test_bad_config_names_the_key(edit, message):
    cfg = copy.deepcopy(CONFIG)
    edit(cfg)
    with pytest.raises(config.ConfigError, match=message):
        config.validate(cfg)


def test_unknown_dataset_lists_the_configured_ones():
    with pytest.raises(config.ConfigError, match=r"dataset 'camelyon17' is not configured; datasets: \['camelyon16'"):
        config.dataset(config.validate(copy.deepcopy(CONFIG)), "camelyon17")


def test_paper_presets_per_dataset():
    cfg = config.validate(copy.deepcopy(CONFIG))
    lr = {name: config.method_config(cfg, name, "histodd", 10)["lr_img"]
          for name in ("camelyon16", "tcga_idh", "unitopath", "pathmnist")}
    assert lr == {"camelyon16": 0.05, "tcga_idh": 0.0005, "unitopath": 0.05, "pathmnist": 0.05}
    methods = config.section(cfg, "camelyon16", "distill")["methods"]
    assert methods["forgetting"]["net"] == methods["herding"]["net"] == "resnet18"
    pool = config.section(cfg, "camelyon16", "distill")["pool"]
    assert max(pool["save_epochs"]) <= pool["train"]["epochs"] <= 5  # early-stage checkpoints
    # each method evaluated under its paper's stain protocol: on for Histo-DD only
    evaluate = config.section(cfg, "camelyon16", "evaluate")
    assert evaluate["stain_norm"] is False and evaluate["stain_norm_methods"] == ["histodd"]
    # the pool sees distillation's augmentation (DSA's strengths: the schema's defaults)
    assert pool["augment"] == {**config.defaults("$defs/augment"), "preset": "all"}



def test_config_overrides_from_the_command_line_are_typed():
    # what `snakemake --config 'tiling={magnification: 5, default_mpp: null, skip_empty: true}'
    # 'datasets={demo: {root: /d}}' 'evaluate={archs: [vit], train: {lr: 1.0e-3}}' dataset=pcam`
    # hands the Snakefile: nested scalars as strings
    given = {"tiling": {"magnification": "5", "default_mpp": "null", "skip_empty": "true"},
             "datasets": {"demo": {"root": "/d"}},
             "evaluate": {"archs": ["vit"], "train": {"lr": "1.0e-3"}}, "dataset": "pcam"}
    typed = config.parse_overrides(given)
    assert typed["tiling"] == {"magnification": 5, "default_mpp": None, "skip_empty": True}
    assert typed["evaluate"] == {"archs": ["vit"], "train": {"lr": 1e-3}}
    assert typed["datasets"]["demo"]["root"] == "/d" and typed["dataset"] == "pcam"
    cfg = config.merge(CONFIG, given)  # how Snakemake merges --config into the config file
    with pytest.raises(config.ConfigError, match="' = '"):
        config.validate(copy.deepcopy(cfg))  # untyped, as before
    cfg = config.validate(config.apply_overrides(cfg, given))
    assert config.tiling(cfg, "demo")["magnification"] == 10  # the dataset's own override wins
    assert cfg["tiling"]["magnification"] == 5 and cfg["evaluate"]["runs"] == 5  # rest kept
    assert cfg["datasets"]["demo"]["root"] == "/d" and cfg["datasets"]["demo"]["synthetic"]
    # a --configfile's free text that happens to read as YAML structure stays text
    text = {"privacy": {"package": {"cohort": "Demo cohort: 40 slides", "licence": "[CC-BY]"}}}
    assert config.parse_overrides(text) == text


@pytest.mark.parametrize("given, message", [
    ({"tiling": "{magnification: 5"}, r"--config: 'tiling=\{magnification: 5' is not valid YAML"),
    ({"stain": "[1, 2"}, r"--config: 'stain=\[1, 2' is not valid YAML"),
])
def test_config_override_that_is_not_yaml_names_the_key(given, message):
    with pytest.raises(config.ConfigError, match=message):
        config.parse_overrides(given)


@pytest.mark.parametrize("given, message", [
    ({"tiling": {"magnifcation": "5"}}, r"'tiling.magnifcation' is not recognised"),
    ({"compute": {"gpu": "1"}}, r"'compute' is not recognised"),
    ({"stain": "dark"}, r"'stain' = 'dark': 'dark' is not of type 'object'"),
    ({"distill": {"cache_mb": "0.5"}}, r"'distill.cache_mb' = 0.5: 0.5 is not of type 'integer'"),
])
def test_config_override_with_a_bad_key_names_it(given, message):
    cfg = copy.deepcopy(CONFIG)
    with pytest.raises(config.ConfigError, match=message):
        config.validate(config.apply_overrides(config.merge(cfg, given), given))


def test_trajectory_defaults_and_per_dataset_profiles():
    minimal = config.validate({"datasets": {}})
    assert minimal["trajectories"]["experts"] == 10 and minimal["trajectories"]["epochs"] == 50
    assert minimal["trajectories"]["net"] == "convnet"  # ConvNet-3, instance norm (MTT)
    assert minimal["trajectories"]["dtype"] == "float32"
    cfg = config.validate(copy.deepcopy(CONFIG))
    mtt = config.method_config(cfg, "camelyon16", "mtt", 10)  # MTT's CIFAR-10 row at ipc 10
    assert (mtt["syn_steps"], mtt["expert_epochs"], mtt["max_start_epoch"]) == (30, 2, 20)
    ptm = config.method_config(cfg, "demo_patches", "ptm", 2)  # profile over the global keys
    assert ptm["iterations"] == 200 and ptm["end_epoch"] == 10 and ptm["sigma"] == "median"
    for name in ("demo", "demo_patches", "pcam"):  # every profile's schedule fits its buffer
        epochs = config.section(cfg, name, "trajectories")["epochs"]
        for ipc in (2, 10):
            m = config.method_config(cfg, name, "mtt", ipc)
            assert m["max_start_epoch"] - 1 + m["expert_epochs"] <= epochs
            assert config.method_config(cfg, name, "ptm", ipc)["end_epoch"] <= epochs


def test_every_per_ipc_setting_is_resolved_per_ipc():
    spec = yaml.safe_load(config.SCHEMA.read_text())
    refs = {f"#/$defs/{d}" for d in ("per_ipc", "per_ipc_count", "per_ipc_rate")}
    names = [n for n in spec["$defs"] if n.endswith("_settings")]
    assert {"method_settings", "histodd_settings", "mtt_settings", "ptm_settings"} <= set(names)
    for name in names:
        per_ipc = {k for k, v in spec["$defs"][name]["properties"].items() if v.get("$ref") in refs}
        assert per_ipc <= set(config.PER_IPC), (name, per_ipc - set(config.PER_IPC))


KEYWORDS = {"$schema", "$defs", "$ref", "description", "default", "type", "properties",
            "additionalProperties", "propertyNames", "required", "items", "enum", "const",
            "oneOf", "allOf", "minimum", "maximum", "exclusiveMinimum", "minItems", "maxItems",
            "uniqueItems", "minProperties", "pattern"}


def schema_properties(node, path=()):
    """(dotted path, property schema) of every property anywhere in the schema: under
    ``properties`` of the sections, of ``$defs`` entries, nested, and inside ``items``,
    ``additionalProperties``, ``allOf`` and ``oneOf``."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from schema_properties(item, (*path, f"[{i}]"))
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("default", "const", "enum"):  # values, not schemas
            continue
        if key in ("properties", "$defs") and isinstance(value, dict):
            where = path if key == "properties" else (*path, "$defs")
            for name, sub in value.items():
                if key == "properties":
                    yield ".".join((*where, str(name))), sub
                yield from schema_properties(sub, (*where, str(name)))
        else:
            yield from schema_properties(value, (*path, key))


def test_every_schema_property_has_a_description():
    spec = yaml.safe_load(config.SCHEMA.read_text())
    properties = list(schema_properties(spec))
    assert len(properties) > 400  # the walk reaches the sections, $defs and nested objects
    missing = [p for p, sub in properties
               if not (isinstance(sub, dict) and isinstance(sub.get("description"), str)
                       and sub["description"].strip())]
    assert not missing, f"schema properties without a description: {missing}"


def test_schema_has_no_stray_keywords():
    """A description in a flow mapping with an unquoted comma becomes a stray key: caught here."""
    spec = yaml.safe_load(config.SCHEMA.read_text())
    stray = []

    def walk(node, path):
        if isinstance(node, list):
            for item in node:
                walk(item, path)
        elif isinstance(node, dict):
            for key, value in node.items():
                if key in ("properties", "$defs"):
                    for name, sub in value.items():
                        walk(sub, f"{path}.{name}")
                elif key not in ("default", "const", "enum"):
                    if key not in KEYWORDS:
                        stray.append(f"{path}: {key}")
                    walk(value, path)

    walk(spec, "")
    assert not stray, stray


OVERLAYS = {"demo": "configs/demo.yaml", "demo_patches": "configs/demo_patches.yaml",
            "pcam": "configs/pcam.yaml"}


def test_config_yaml_and_the_overlays_validate_and_the_schema_defaults_land():
    assert [p.relative_to(config.ROOT).as_posix() for p in config.overlays(*OVERLAYS)] == \
        list(OVERLAYS.values())
    shipped = yaml.safe_load(config.CONFIG.read_text())
    assert not set(OVERLAYS) & set(shipped["datasets"])  # the profiles live in their overlays
    alone = config.load(config.CONFIG)
    for name, path in OVERLAYS.items():
        raw = yaml.safe_load((config.ROOT / path).read_text())
        assert list(raw) == ["datasets"] and list(raw["datasets"]) == [name]  # its dataset only
        # Snakemake hands --configfile contents to the Snakefile as overrides, which it types
        # (config.apply_overrides): an overlay must read the same that way
        assert config.parse_overrides(raw) == raw
        cfg = config.load(config.CONFIG, config.ROOT / path)
        assert {k: v for k, v in cfg.items() if k != "datasets"} == \
            {k: v for k, v in alone.items() if k != "datasets"}  # it changes its dataset alone
    cfg = config.validate(copy.deepcopy(CONFIG))
    assert cfg["distill"]["methods"]["histodd"]["inner_loop"] == 100
    assert cfg["distill"]["methods"]["histodd"]["outer_loop"] == {10: 200, 20: 500, 50: 1000}
    assert cfg["distill"]["methods"]["random"] == {}
    assert cfg["mil"]["settings"]["clam_sb"]["epochs"] == 200
    assert cfg["mil"]["settings"]["transmil"]["lookahead"] == {"k": 6, "alpha": 0.5}
    assert cfg["encoders"]["simclr"]["kind"] == "simclr" and cfg["encoders"]["simclr"]["proj_dim"] == 256
    assert cfg["select"]["methods"]["infodist_real"]["source"] == "real"
    assert cfg["select"]["methods"]["infodist_real"]["eta"] == 0.001  # infodist's, merged
    assert cfg["evaluate"]["train"] == {"epochs": 1000, "lr": 0.01, "batch": 256, "schedule": "step",
                                        "momentum": 0.9, "weight_decay": 5e-4, "sam_rho": 0.0,
                                        "compute": {"precision": "auto", "channels_last": "auto"}}
    assert cfg["privacy"]["package"]["intended_use"].startswith("Research on training")
    # the overlays' profiles over the defaults
    demo = config.method_config(cfg, "demo", "histodd", 10)
    assert (demo["outer_loop"], demo["inner_loop"], demo["lr_img"]) == (60, 10, 0.05)
    assert config.mil(cfg, "demo")["settings"]["clam_sb"] == {**cfg["mil"]["settings"]["clam_sb"],
                                                             "epochs": 40}
    assert config.method_config(cfg, "pcam", "dm", 2)["iterations"] == 1018


def test_a_dataset_without_its_overlay_names_the_overlay():
    cfg = config.load(config.CONFIG)
    with pytest.raises(config.ConfigError, match=r"dataset 'demo' is not configured; datasets: "
                                                 r"\['camelyon16'.*`--configfile \S*configs/demo.yaml`"):
        config.dataset(cfg, "demo")
    with pytest.raises(config.ConfigError) as err:
        config.dataset(cfg, "camelyon17")  # no overlay: the configured datasets only
    assert "configs/" not in str(err.value)
