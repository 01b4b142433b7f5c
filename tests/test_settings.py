"""Defaults in one place: the schema (workflow/schemas/config.schema.yaml) is the only source of
a setting's default. The library reads validated sections, every key present, so it holds no
literal fallback for a setting the schema defines, no function a literal default for a parameter
that carries one, and its settings classes no field defaults."""

from __future__ import annotations

import ast
import dataclasses
import importlib
from pathlib import Path

import pytest
import yaml

from histodistill import config

PACKAGE = config.ROOT / "histodistill"
SPEC = yaml.safe_load(config.SCHEMA.read_text())


def _keys(node) -> set[str]:
    """Every property name defined anywhere in the schema (sections, $defs, nested)."""
    found: set[str] = set()
    if isinstance(node, list):
        for item in node:
            found |= _keys(item)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in ("default", "const", "enum"):  # values, not schemas
                continue
            if key == "properties" and isinstance(value, dict):
                found |= set(value)
            found |= _keys(value)
    return found


SETTINGS = _keys(SPEC)

# Receivers of .get that are not config sections: result files and their records (result,
# record, r, rec), CSV rows (row, rec), store and model attributes (attrs, meta) and checkpoint
# state dicts (state). Their keys can share a name with a setting ("split", "full", "source",
# "patch_size") without being one, and a fallback there is about old or partial files, not about
# settings. Anything else that calls .get("<setting>", <literal>) is a duplicated default.
NOT_CONFIG = {"result", "record", "r", "rec", "row", "meta", "attrs", "state"}


def _receiver(node: ast.expr) -> str:
    """The name a call's receiver ends in: ``cfg`` for ``cfg.get``, ``attrs`` for
    ``store.attrs.get``, ``r`` for ``r["distill"].get``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript):
        return _receiver(node.value)
    if isinstance(node, ast.Call):
        return _receiver(node.func)
    return ""


def _literal(node: ast.expr) -> bool:
    """A literal other than None (a number, string, bool, or a container of literals)."""
    try:
        return ast.literal_eval(node) is not None
    except ValueError:
        return False


def _setting_lookup(node: ast.AST) -> str | None:
    """The key of ``X.get("<setting>", ...)`` (also ``pop`` and ``setdefault``) on a receiver that
    may be config, else None."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("get", "pop", "setdefault") and node.args
            and isinstance(node.args[0], ast.Constant) and node.args[0].value in SETTINGS
            and _receiver(node.func.value) not in NOT_CONFIG):
        return str(node.args[0].value)
    return None


def literal_fallbacks(path: Path) -> list[str]:
    """``file:line`` of each literal fallback for a setting in one source file:
    ``X.get("<setting>", <literal>)`` and ``X.get("<setting>") or <literal>``."""
    tree = ast.parse(path.read_text(), str(path))
    where = path.relative_to(config.ROOT).as_posix()
    found = []
    for node in ast.walk(tree):
        key = _setting_lookup(node)
        if key is not None and isinstance(node, ast.Call) and len(node.args) > 1 \
                and _literal(node.args[1]):
            found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
        if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
            first, rest = node.values[0], node.values[1:]
            if _setting_lookup(first) is not None and any(_literal(v) for v in rest):
                found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_library_has_no_literal_fallback_for_a_setting():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50
    found = [hit for path in files for hit in literal_fallbacks(path)]
    assert not found, ("literal defaults of settings the schema defines (index the validated "
                       "section; a default the schema lacks goes into the schema):\n"
                       + "\n".join(found))


def walked(code: str, walk) -> list[str]:  # noqa: ANN001
    """What ``walk`` finds in ``code``, written as a module of the library for the walk."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".py", dir=PACKAGE, delete=False) as f:
        f.write(code)
    path = Path(f.name)
    try:
        return walk(path)
    finally:
        path.unlink()


def test_the_walk_sees_a_fallback():
    """The walk itself: a fallback is found, an allowlisted receiver and a non-setting are not."""
    code = ('a = cfg.get("dropout", 0.25)\nb = result.get("split", "")\n'
            'c = cfg.get("not_a_setting", 1)\nd = self.cfg.get("unit_grad") or False\n'
            'e = cfg.get("net_kwargs")\n')
    hits = walked(code, literal_fallbacks)
    assert [h.split(": ", 1)[1] for h in hits] == ["cfg.get('dropout', 0.25)",
                                                   "self.cfg.get('unit_grad') or False"]


# Each settings class and the schema section it is built from: `from_config` takes that section,
# validated (every key present), so none of its fields that are settings has a default.
SETTINGS_CLASSES = {
    "histodistill.training.TrainConfig": "$defs/train",
    "histodistill.augment.AugmentConfig": "$defs/augment",
    "histodistill.privacy.audit.AuditConfig": "privacy",
    "histodistill.synth.cohort.DemoSpec": "demo",
    "histodistill.synth.patches.PatchDemoSpec": "demo_patches",
    "histodistill.generate.diffusion.Schedule": "generate.generator.schedule",
}


def _section(pointer: str) -> dict:
    """The schema of a ``$defs/<name>`` entry or of a dotted config section, ``$ref`` followed."""
    def resolve(node):
        while "$ref" in node and "properties" not in node:
            node = SPEC["$defs"][node["$ref"].rsplit("/", 1)[1]]
        return node

    if pointer.startswith("$defs/"):
        return resolve(SPEC["$defs"][pointer.split("/", 1)[1]])
    node = SPEC
    for part in pointer.split("."):
        node = resolve(resolve(node)["properties"][part])
    return node


def _dataclasses_with_from_config() -> set[str]:
    """Dotted names of the package's dataclasses that have a ``from_config`` classmethod."""
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(config.ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            is_dataclass = any("dataclass" in ast.unparse(d) for d in node.decorator_list)
            has_from_config = any(isinstance(f, ast.FunctionDef) and f.name == "from_config"
                                  for f in node.body)
            if is_dataclass and has_from_config:
                found.add(f"{module}.{node.name}")
    return found


def test_every_settings_class_is_known():
    assert _dataclasses_with_from_config() == set(SETTINGS_CLASSES)


@pytest.mark.parametrize("name", sorted(SETTINGS_CLASSES))
def test_settings_classes_have_no_defaults_for_settings(name):
    module, cls_name = name.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), cls_name)
    assert hasattr(cls, "from_config"), f"{name} is built from its section by from_config"
    settings = set(_section(SETTINGS_CLASSES[name])["properties"])
    defaulted = [f.name for f in dataclasses.fields(cls) if f.name in settings
                 and (f.default is not dataclasses.MISSING
                      or f.default_factory is not dataclasses.MISSING)]
    assert not defaulted, (f"{name}: fields {defaulted} default what the schema's "
                           f"{SETTINGS_CLASSES[name]} defines")


# ---- the schema's defaults as a helper, and where they must not fill -------------------------------
def test_defaults_of_a_def_and_of_a_config_path():
    assert config.defaults("$defs/train") == {"epochs": 1000, "lr": 0.01, "momentum": 0.9,
                                              "weight_decay": 5e-4, "batch": 256, "schedule": "step",
                                              "sam_rho": 0.0,
                                              "compute": {"precision": "auto", "channels_last": "auto"}}
    # a path's own default first, then the defaults of its schema under it
    assert config.defaults("trajectories.train") == {**config.defaults("$defs/train"), "lr": 0.01,
                                                     "momentum": 0, "weight_decay": 0,
                                                     "schedule": "constant"}
    assert config.defaults("mil.settings.clam_sb")["dropout"] == 0.25
    assert config.defaults("distill.methods.herding")["augment"]["preset"] == "none"
    assert config.defaults("datasets.*")["layout"] == "table"  # additionalProperties
    minimal = config.validate({"datasets": {}})
    for section in ("evaluate", "privacy", "demo", "demo_patches", "trajectories", "generate"):
        assert config.defaults(section) == minimal[section], section
    with pytest.raises(KeyError, match="distill.methods.nope.x"):
        config.defaults("distill.methods.nope.x")


def test_overrides_of_settings_take_no_defaults():
    """Per-slide overrides (mil.distill.<method>) and a method's own expert buffer
    (distill.methods.ptm.trajectories) override settings: a default filled into them would
    replace the value they override."""
    cfg = config.load(config.CONFIG, *config.overlays("demo"))
    cfg["mil"]["distill"] = {"histodd": {"augment": {"ops": ["flip"]}, "train": {"epochs": 3}}}
    cfg["distill"]["methods"]["ptm"]["trajectories"] = {"epochs": 40, "train": {"sam_rho": 0.02},
                                                        "augment": {"flip": 0.2}}
    cfg = config.validate(cfg)
    assert cfg["mil"]["distill"]["histodd"] == {"augment": {"ops": ["flip"]}, "train": {"epochs": 3}}
    per_slide = config.slide_method_config(cfg, "demo", "histodd", 10)
    assert per_slide["augment"] == {**config.defaults("$defs/augment"), "preset": "all", "ops": ["flip"]}
    own = cfg["distill"]["methods"]["ptm"]["trajectories"]
    assert own == {"epochs": 40, "train": {"sam_rho": 0.02}, "augment": {"flip": 0.2}}
    merged = config.merge(config.section(cfg, "demo", "trajectories"), own)
    assert merged["train"]["momentum"] == 0 and merged["train"]["sam_rho"] == 0.02


def test_a_candidates_mapping_takes_the_schemas_defaults():
    """A tuning candidate or study variant replaces a whole setting: a mapping it gives is
    completed as a config file's would be, the rest of the method's settings untouched."""
    cfg = config.defaults("distill.methods.dm")
    tuned = config.with_candidate(cfg, {"augment": {"preset": "none"}, "lr_img": 0.5}, "dm")
    assert tuned == {**cfg, "augment": {**config.defaults("$defs/augment"), "preset": "none"},
                     "lr_img": 0.5}
    assert config.with_candidate(cfg, {}, "dm") == cfg


# ---- signatures: no literal default for a parameter that carries a setting ------------------------
# Parameters named like a schema property whose default is not that setting's: what each means
# instead. Keys are ``<file>:<function>(<parameter>)``; a stale entry fails the test below.
NOT_A_SETTING = {
    "a data split to read or test on (train/val/test), not stain.split": [
        "histodistill/evaluate.py:train_on_set(split)",
        "histodistill/evaluate.py:set_record(split)",
        "histodistill/training.py:evaluate_arch(split)",
        "histodistill/slides/cohort.py:_split_by_slide(split)",
        "histodistill/mil/train.py:Bags.__init__(split)",
        "histodistill/select/centroid.py:class_centroids(split)",
    ],
    "images per forward pass of an embedding or normalisation, not a training batch setting": [
        "histodistill/data/ingest.py:ingest_images(batch)",
        "histodistill/generate/quality.py:generator_quality(batch)",
        "histodistill/select/base.py:Candidates.__init__(batch)",
        "histodistill/select/centroid.py:class_centroids(batch)",
        "histodistill/stain.py:normalise(batch)",
    ],
    "batches a prefetching thread reads ahead, not the generator's depth": [
        "histodistill/data/real.py:device_batches(depth)",
        "histodistill/data/stream.py:prefetch(depth)",
    ],
    "the dataset's channel statistics (identity when absent), not an encoder's mean and std": [
        "histodistill/augment.py:Augment.__init__(mean)",
        "histodistill/augment.py:Augment.__init__(std)",
    ],
    "LDM's dropout (0), not a generate.autoencoder setting (dropout is a MIL model's)": [
        "histodistill/generate/autoencoder.py:ResBlock.__init__(dropout)",
        "histodistill/generate/autoencoder.py:Encoder.__init__(dropout)",
        "histodistill/generate/autoencoder.py:Decoder.__init__(dropout)",
        "histodistill/generate/autoencoder.py:AutoencoderKL.__init__(dropout)",
    ],
    "PatchGAN's base width (taming's NLayerDiscriminator), not demo.width": [
        "histodistill/generate/autoencoder.py:PatchDiscriminator.__init__(width)",
    ],
    "an evaluation network's architecture as its paper gives it (DC's ConvNet, IDC's ResNetAP, a "
    "small ViT); net_kwargs and arch_kwargs override it and the schema leaves them open": [
        "histodistill/models.py:ConvNet.__init__(width)",
        "histodistill/models.py:ConvNet.__init__(depth)",
        "histodistill/models.py:ResNetAP10.__init__(width)",
        "histodistill/models.py:ViT.__init__(dim)",
        "histodistill/models.py:ViT.__init__(depth)",
        "histodistill/models.py:ViT.__init__(heads)",
    ],
    "the smooth top-1 SVM loss's margin and temperature (CLAM's), not histodd.alpha or "
    "evaluate.boundary.tau": [
        "histodistill/mil/clam.py:smooth_top1_svm(alpha)",
        "histodistill/mil/clam.py:smooth_top1_svm(tau)",
    ],
    "samples per patch side of the tumour-fraction grid, not privacy.samples": [
        "histodistill/slides/annotations.py:tumour_fraction(samples)",
    ],
    "the report command's Snakemake targets, not the config's targets section": [
        "histodistill/report.py:build_report(targets)",
    ],
}
NOT_A_SETTING_KEYS = {key for keys in NOT_A_SETTING.values() for key in keys}


def _constant(node: ast.expr) -> bool:
    """A default that fixes a value: a literal other than None (and other than the ``...`` of an
    overload stub), or a module constant (an UPPER_CASE name, e.g. ``IO = 240.0``)."""
    if isinstance(node, ast.Constant) and node.value is Ellipsis:
        return False
    if isinstance(node, ast.Name):
        return node.id.isupper()
    return _literal(node)


def setting_defaults(path: Path) -> list[str]:
    """``file:function(parameter)`` of each parameter named like a setting whose default is a
    literal or a module constant, in one source file (overload stubs left out)."""
    tree = ast.parse(path.read_text(), str(path))
    where = path.relative_to(config.ROOT).as_posix()
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if not any("overload" in ast.unparse(d) for d in child.decorator_list):
                    a = child.args
                    positional = a.posonlyargs + a.args
                    pairs = [*zip(positional[len(positional) - len(a.defaults):], a.defaults),
                             *[(p, d) for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]]
                    found.extend(f"{where}:{prefix}{child.name}({p.arg})" for p, d in pairs
                                 if p.arg in SETTINGS and _constant(d))
                visit(child, f"{prefix}{child.name}.<locals>.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def test_no_signature_defaults_a_setting():
    """A function takes a setting from its caller, who has it from the validated config: a
    literal default there would be a second default, used whenever a caller forgets one (make
    it required and keyword-only)."""
    files = sorted(PACKAGE.rglob("*.py"))
    found = [hit for path in files for hit in setting_defaults(path)]
    assert not [hit for hit in found if hit not in NOT_A_SETTING_KEYS], (
        "parameters named like a setting with a literal default (make them required and "
        "keyword-only, or list what they mean instead in NOT_A_SETTING):\n"
        + "\n".join(hit for hit in found if hit not in NOT_A_SETTING_KEYS))
    assert not NOT_A_SETTING_KEYS - set(found), "stale NOT_A_SETTING entries"


def test_the_signature_walk_sees_a_default():
    code = ("IO = 240.0\n\n\ndef f(x, cache_mb: float = 1024, *, batch: int = 256, weights=None,\n"
            "      io: float = IO, not_a_setting: int = 3) -> None: ...\n\n\n"
            "class C:\n    def __init__(self, dropout=0.1, depth=PREFETCH_DEPTH):\n"
            "        def inner(seed=0): ...\n\n\n"
            "@overload\ndef g(split: str = ...) -> None: ...\n")
    hits = walked(code, setting_defaults)
    assert [h.split(":", 1)[1] for h in hits] == [
        "f(cache_mb)", "f(batch)", "f(io)", "C.__init__(dropout)", "C.__init__(depth)",
        "C.__init__.<locals>.inner(seed)"]
