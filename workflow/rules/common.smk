# Config validation and the small helpers every rule reads its settings through.
import histodistill.config as hdconfig

try:
    hdconfig.validate(config)
except hdconfig.ConfigError as err:
    raise WorkflowError(str(err)) from None


wildcard_constraints:
    dataset=r"[A-Za-z0-9_\-]+",


ENV = "../../envs/histodistill.yaml"


def dataset_cfg(name):
    """A dataset's config entry without its tiling overrides (those go to rule tile)."""
    return {k: v for k, v in hdconfig.dataset(config, name).items() if k != "tiling"}


def tiling_cfg(name):
    return hdconfig.tiling(config, name)


def datasets_of(formats):
    """Regex matching the configured datasets whose format is in ``formats``."""
    names = [n for n, d in config["datasets"].items() if d["format"] in formats]
    return "|".join(names) if names else "(?!)"


def cohort_input(wildcards):
    """The generated demo cohort for synthetic datasets; real roots are checked here, early."""
    ds = hdconfig.dataset(config, wildcards.dataset)
    if ds.get("synthetic"):
        return [ds["root"]]
    from histodistill.cohort import resolve_root

    resolve_root(wildcards.dataset, ds)  # clear message naming the key when root is unset
    return []


def final_targets(name):
    """What a finished run of the stages built so far produces for one dataset."""
    return [f"results/{name}/patches.zarr", f"results/{name}/stain/template.json"]
