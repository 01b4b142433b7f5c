"""Config validation against the workflow's JSON schema, with one clear message per problem.

The Snakefile calls :func:`validate` on load; the message names the offending key by its dotted
path and lists the allowed keys or values. Defaults from the schema, their only source, are
filled in. ``config.yaml`` holds what a user edits; the demo, pre-tiled demo and PCam profiles
are overlays, ``configs/<dataset>.yaml``, that Snakemake merges over it with ``--configfile``
(:func:`read` merges the same way, for code that loads a config outside Snakemake).
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from histodistill import catalogue

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
CONFIG = ROOT / "config.yaml"  # what a user edits
OVERLAYS = ROOT / "configs"  # configs/<dataset>.yaml: a dataset's profile, given with --configfile


class ConfigError(ValueError):
    """The config does not match the schema; the message names the key."""


def _with_defaults(validator_class: Any) -> Any:
    """``validator_class`` (a jsonschema validator) that also fills in each missing property's
    ``default`` as it validates: the schema is the one source of defaults."""
    validate_props = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # noqa: ANN001
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_FILLING = _with_defaults(jsonschema.Draft202012Validator)


def _message(err: jsonschema.ValidationError, prefix: tuple[str, ...] = ()) -> str:
    path = [*prefix, *err.absolute_path]
    key = ".".join(str(p) for p in path) or "<top level>"
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        allowed = sorted(err.schema.get("properties", {}))
        where = f"{key}." if path else ""
        return f"config key '{where}{extra[0]}' is not recognised; allowed keys here: {allowed}"
    if err.validator == "enum":
        return f"config key '{key}' = {err.instance!r} is not allowed; choose one of {err.validator_value}"
    if err.validator == "required":
        return f"config key '{key}': {err.message}"
    if err.validator == "oneOf" and err.schema.get("description"):  # e.g. a per-ipc count
        return f"config key '{key}' = {err.instance!r}: expected {err.schema['description']}"
    return f"config key '{key}' = {err.instance!r}: {err.message}"


# sections a dataset entry may override
OVERRIDES = ("tiling", "distill", "evaluate", "trajectories", "encoders", "privacy", "mil",
             "generate", "select", "tuning")


def load_schema(schema: str | os.PathLike = SCHEMA) -> dict[str, Any]:
    """The config schema, its method enums (``$defs.method``, ``$defs.selection_method``)
    filled in from the catalogue."""
    if Path(schema) == SCHEMA and not SCHEMA.is_file():
        raise ConfigError(f"[config] {SCHEMA}: not found. histodistill's library runs from its "
                          "repository (the workflow, schema and config live beside the package): "
                          "install it from the clone with `pip install -e .` (what `make venv` "
                          "does), not as a copy with `pip install .`")
    with open(schema) as f:
        spec = yaml.safe_load(f)
    spec["$defs"]["method"]["enum"] = catalogue.names()
    spec["$defs"]["selection_method"]["enum"] = catalogue.names("select")
    return spec


@functools.lru_cache(maxsize=4)
def _schema(schema: str) -> dict[str, Any]:
    """:func:`load_schema`, read once per process (callers must not change it)."""
    return load_schema(schema)


def schema_at(pointer: str, schema: str | os.PathLike = SCHEMA) -> dict[str, Any]:
    """The schema of a setting: ``$defs/<name>`` (e.g. ``$defs/train``) or a dotted config path
    (e.g. ``distill.methods.ptm``, ``mil.settings.clam_sb``, ``trajectories.train``; a name a
    mapping does not list takes its ``additionalProperties``: ``encoders.<any>``,
    ``datasets.<any>``). A ``$ref`` is followed where the path goes on through it; the node of
    the last key is returned as written (its own ``default`` included)."""
    spec = _schema(str(schema))

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node and "properties" not in node:
            node = spec["$defs"][node["$ref"].rsplit("/", 1)[1]]
        return node

    if pointer.startswith("$defs/"):
        name = pointer.split("/", 1)[1]
        if name not in spec["$defs"]:
            raise KeyError(f"the schema has no $defs entry {name!r}")
        return spec["$defs"][name]
    node: dict[str, Any] = spec
    for part in pointer.split("."):
        node = resolve(node)
        if part in node.get("properties", {}):
            node = node["properties"][part]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            raise KeyError(f"the schema has no config key {pointer!r} ({part!r} is not one)")
    return node


def _filled(instance: Any, node: dict[str, Any], schema: str | os.PathLike = SCHEMA) -> Any:
    """``instance`` with the defaults of the schema ``node`` filled in, in place, at every
    depth the schema describes (its errors, e.g. a missing required key, are not reported)."""
    spec = _schema(str(schema))
    validator = _FILLING({"$defs": spec["$defs"], **node})
    for _ in validator.iter_errors(instance):
        pass
    return instance


def defaults(pointer: str, schema: str | os.PathLike = SCHEMA) -> dict[str, Any]:
    """The settings a config holds at ``pointer`` (see :func:`schema_at`) when it gives none:
    the schema's defaults, e.g. ``defaults("$defs/train")`` or ``defaults("distill.methods.ptm")``.
    A complete section for code and tests that build one by hand:
    ``{**config.defaults("$defs/train"), "epochs": 2}``."""
    node = schema_at(pointer, schema)
    return _filled(copy.deepcopy(node.get("default", {})), node, schema)


def validate(config: dict[str, Any], schema: str | os.PathLike = SCHEMA) -> dict[str, Any]:
    """Validate ``config`` in place (filling defaults) and return it, or raise ConfigError.

    Each ``datasets.<name>.<section>`` override is checked against the schema of the global
    section, without filling defaults (a default there would replace the global value)."""
    _check_finite(config, ())
    spec = load_schema(schema)
    validator = _with_defaults(jsonschema.Draft202012Validator)(spec)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("invalid config: " + _message(errors[0]))
    for name, entry in config["datasets"].items():
        for key in OVERRIDES:
            if key not in entry:
                continue
            section_schema = {"$defs": spec.get("$defs", {}), **spec["properties"][key]}
            plain = jsonschema.Draft202012Validator(section_schema)
            errors = sorted(plain.iter_errors(entry[key]), key=lambda e: list(e.absolute_path))
            if errors:
                raise ConfigError("invalid config: " + _message(errors[0], ("datasets", name, key)))
        _check_own_experts(config, name)
    return config


def _check_finite(node: Any, where: tuple[Any, ...]) -> None:
    """No NaN anywhere in the config: it passes every bound of the schema (a comparison with
    NaN is false) and would reach the stages as a number (YAML's ``.nan``)."""
    if isinstance(node, float) and node != node:
        raise ConfigError(f"invalid config: config key '{'.'.join(map(str, where))}' = nan: not a "
                          "number")
    children = node.items() if isinstance(node, dict) else (
        enumerate(node) if isinstance(node, list) else ())
    for key, value in children:
        _check_finite(value, (*where, key))


def _check_own_experts(config: dict[str, Any], name: str) -> None:
    """A trajectory method with its own expert buffer (``distill.methods.<m>.trajectories``)
    needs experts that reach its last end point: checked on load, naming the key."""
    trajectories = section(config, name, "trajectories")
    for method, cfg in section(config, name, "distill")["methods"].items():
        if "trajectories" not in cfg or "end_epoch" not in cfg:
            continue
        epochs = merge(trajectories, cfg["trajectories"])["epochs"]
        if epochs < cfg["end_epoch"]:
            raise ConfigError(f"invalid config: 'distill.methods.{method}.trajectories.epochs' is "
                              f"{epochs} for dataset {name!r}, below its end_epoch "
                              f"{cfg['end_epoch']}: the experts must reach the last end point")


def _typed(value: Any) -> Any:
    """A ``--config`` value with every string leaf read as a YAML scalar ('1' -> 1, 'null' ->
    None). A leaf that reads as a mapping or list stays the string it is: Snakemake has parsed
    the structure already, and these values also hold the ``--configfile`` files' own strings
    (a description such as "cohort: 40 slides" must not turn into a mapping)."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    if isinstance(value, str):
        try:
            typed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        return value if isinstance(typed, (dict, list)) else typed
    return value


def parse_overrides(overrides: dict[str, Any], schema: str | os.PathLike = SCHEMA) -> dict[str, Any]:
    """Type the values of ``snakemake --config``: Snakemake reads ``tiling={magnification: 5}``-style
    values with YAML's base loader, so nested scalars arrive as strings and a value that is not
    valid YAML arrives as the raw string. A section of the schema given as such a string gets an
    error naming the key; scalars are read as YAML, so documented keys validate as in a file."""
    with open(schema) as f:
        sections = {k for k, v in yaml.safe_load(f)["properties"].items()
                    if v.get("type") == "object" or "$ref" in v}
    typed = {}
    for key, value in overrides.items():
        if key in sections and isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as err:
                mark = getattr(err, "problem", None) or str(err).splitlines()[0]
                raise ConfigError(f"invalid --config: '{key}={value}' is not valid YAML ({mark})") from None
        typed[key] = _typed(value)
    return typed


def apply_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Replace, in place, the values ``--config`` put into ``config`` by their typed form."""
    config.update(merge(config, parse_overrides(overrides)))
    return config


def overlay(name: str) -> Path | None:
    """``configs/<name>.yaml``, the overlay that configures dataset ``name``, if there is one."""
    path = OVERLAYS / f"{name}.yaml"
    return path if path.is_file() else None


def overlays(*names: str) -> list[Path]:
    """The overlays of those of ``names`` that have one (see :func:`overlay`)."""
    return [p for p in map(overlay, names) if p is not None]


def read(*paths: str | os.PathLike) -> dict[str, Any]:
    """Config files merged in order, each over the ones before by :func:`merge` (as
    ``snakemake --configfile`` merges them over the Snakefile's ``config.yaml``), not validated."""
    config: dict[str, Any] = {}
    for path in paths:
        with open(path) as f:
            config = merge(config, yaml.safe_load(f) or {})
    return config


def load(*paths: str | os.PathLike) -> dict[str, Any]:
    """Read config files (:func:`read`: e.g. ``config.yaml`` and the overlays of
    :func:`overlays`) and validate the merged config."""
    return validate(read(*paths))


def dataset(config: dict[str, Any], name: str) -> dict[str, Any]:
    """One dataset's entry, or an error listing the configured datasets (and naming the
    overlay to add when ``configs/<name>.yaml`` exists)."""
    if name not in config["datasets"]:
        raise ConfigError(not_configured(config, name))
    return config["datasets"][name]


def not_configured(config: dict[str, Any], name: str) -> str:
    """The message for a dataset that is not configured: the configured ones, and the overlay
    that configures it, if there is one."""
    message = f"dataset {name!r} is not configured; datasets: {sorted(config['datasets'])}"
    path = overlay(name)
    if path is not None:
        shown = os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)
        message += (f"; its settings are the overlay {shown}: add `--configfile {shown}` to the "
                    "snakemake command")
    return message


def tiling(config: dict[str, Any], name: str) -> dict[str, Any]:
    """Tiling settings for a dataset: the global ``tiling`` section overridden per dataset."""
    return section(config, name, "tiling")


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else in ``override`` replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def section(config: dict[str, Any], name: str, key: str) -> dict[str, Any]:
    """A stage's settings for one dataset: ``config[key]`` deep-merged with
    ``datasets.<name>.<key>`` (how the demo profile and per-dataset defaults are expressed)."""
    return merge(config[key], dataset(config, name).get(key, {}))


PER_IPC = ("iterations", "outer_loop", "inner_loop", "lr_img",  # may be given per ipc
           "syn_steps", "expert_epochs", "max_start_epoch", "lr_lr", "lr_teacher")


def per_ipc(value: Any, ipc: int, where: str) -> Any:
    """A setting given as one value or as ``{ipc: value}``; a missing ipc names the key."""
    if not isinstance(value, dict):
        return value
    table = {int(k): v for k, v in value.items()}
    if ipc not in table:
        raise ConfigError(f"config key '{where}' has no entry for ipc={ipc} (it has "
                          f"{sorted(table)}); add one or give a single value")
    return table[ipc]


def method_config(config: dict[str, Any], name: str, method: str, ipc: int) -> dict[str, Any]:
    """Settings of one distillation method for a dataset and ipc, per-ipc values resolved."""
    dist = section(config, name, "distill")
    if ipc < 1:
        raise ConfigError(f"target {method}_ipc{ipc} of dataset {name!r}: ipc is the number of "
                          "images per class, at least 1")
    if method not in dist["methods"]:
        raise ConfigError(f"distillation method {method!r} is not configured under "
                          f"distill.methods; configured: {sorted(dist['methods'])}")
    cfg = {k: per_ipc(v, ipc, f"distill.methods.{method}.{k}") if k in PER_IPC else v
           for k, v in dist["methods"][method].items()}
    cfg.setdefault("checkpoint_every", dist["checkpoint_every"])
    return cfg


def with_candidate(cfg: dict[str, Any], overrides: dict[str, Any], method: str
                   ) -> dict[str, Any]:
    """A method's settings with one tuning candidate's overrides; a key the method does not
    have is an error naming it (a typo would otherwise tune nothing). An override replaces the
    whole setting, so a mapping it gives (e.g. ``augment: {preset: none}``) takes the schema's
    defaults for the keys it leaves out."""
    unknown = sorted(set(overrides) - set(cfg))
    if unknown:
        raise ConfigError(f"config key 'tuning.candidates.{method}': {unknown} are not settings "
                          f"of distill.methods.{method}; its settings: {sorted(cfg)}")
    given = copy.deepcopy(overrides)
    for key, value in given.items():
        if isinstance(value, dict):
            _filled(value, schema_at(f"distill.methods.{method}.{key}"))
    return {**cfg, **given}


def check_per_slide(method: str) -> None:
    """Raise ConfigError when ``method`` cannot be applied to each slide separately (its
    catalogue row says why)."""
    why = catalogue.get(method).not_per_slide
    if why:
        can = [m.name for m in catalogue.CATALOGUE if not m.not_per_slide]
        raise ConfigError(f"distillation method {method!r} cannot run per slide (slide-level "
                          f"evaluation distils each slide separately): {why}; the methods that "
                          f"can: {can}")


def slide_method_config(config: dict[str, Any], name: str, method: str, ipc: int
                        ) -> dict[str, Any]:
    """Settings of ``method`` applied to one slide: its distillation settings for the dataset and
    ipc, overridden by ``mil.distill.<method>`` (per-slide sets are small: fewer iterations
    may do). A method that cannot run per slide is a ConfigError naming it."""
    check_per_slide(method)
    cfg = method_config(config, name, method, ipc)
    override = mil(config, name)["distill"].get(method, {})
    return merge(cfg, {k: per_ipc(v, ipc, f"mil.distill.{method}.{k}") if k in PER_IPC else v
                       for k, v in override.items()})


MIL_REQUIRED = ("epochs", "lr", "weight_decay")  # every mil.settings.<model> must give these


def mil(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The ``mil`` section for a dataset; a model it trains (``models``, ``transfer.model``)
    without its ``settings`` entry, or missing one of :data:`MIL_REQUIRED`, names the key."""
    cfg = section(config, name, "mil")
    for model in [*cfg["models"], cfg["transfer"]["model"]]:
        have = cfg["settings"].get(model)
        if have is None:
            raise ConfigError(f"config key 'mil.settings.{model}' is missing (model {model!r} "
                              f"is trained for dataset {name!r})")
        missing = [k for k in MIL_REQUIRED if k not in have]
        if missing:
            raise ConfigError(f"config key 'mil.settings.{model}' lacks {missing}")
    return cfg
