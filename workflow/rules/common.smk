# Config validation and the small helpers every rule reads its settings through.
import os
import sys
from pathlib import Path

import histodistill.catalogue as hdcatalogue
import histodistill.config as hdconfig
import histodistill.io as hdio
import histodistill.params as hdparams

# Methods whose set is made by distillation (optimisation, coresets) or by selection from a
# pool: the catalogue's rows (histodistill/catalogue.py)
DISTILL_METHODS = hdcatalogue.names("distill")
SELECT_METHODS = hdcatalogue.names("select")

try:
    hdconfig.apply_overrides(config, workflow.config_settings.overwrite_config)
    hdconfig.validate(config)
except hdconfig.ConfigError as err:
    raise WorkflowError(str(err)) from None


wildcard_constraints:
    dataset=r"[A-Za-z0-9_\-]+",
    method="|".join(DISTILL_METHODS + SELECT_METHODS),
    ipc=r"\d+",
    seed=r"(_s\d+)?",  # a further distillation seed (empty: distill.seed)
    arch=r"[a-z0-9]+",
    encoder=r"[A-Za-z0-9_]+",


ENV = "../../envs/histodistill.yaml"

# Walltime of any job, in minutes: 48 h, the limit of common GPU and CPU partitions. The long
# stages resume from their checkpoints, so a job stopped at the limit continues on its retry
# (the profile's retries) instead of asking for more time (docs/cluster.md).
MAX_RUNTIME = 2880


def runtime(minutes, per=None):
    """A rule's runtime resource: ``minutes`` (times ``per(wildcards)`` when given, e.g. slides
    per job), growing with the attempt up to :data:`MAX_RUNTIME`."""
    return lambda wc, attempt: min(
        minutes * (per(wc) if per else 1) * attempt, MAX_RUNTIME
    )


STAGE_OVERRIDES = (
    "tiling",
    "distill",
    "evaluate",
    "trajectories",
    "encoders",
    "privacy",
    "mil",
    "generate",
    "select",
    "tuning",
)  # reach only their own stage's rules


def dataset_cfg(name):
    """A dataset's config entry without its per-stage overrides, so editing those reruns only
    their own stages."""
    return {
        k: v
        for k, v in hdconfig.dataset(config, name).items()
        if k not in STAGE_OVERRIDES
    }


def tiling_cfg(name):
    return hdconfig.tiling(config, name)


def datasets_of(formats):
    """Regex matching the configured datasets whose format is in ``formats``."""
    names = [n for n, d in config["datasets"].items() if d["format"] in formats]
    return "|".join(names) if names else "(?!)"


def section(name, key):
    """A stage's config section for one dataset (global, deep-merged with dataset overrides)."""
    return hdconfig.section(config, name, key)


def method_cfg(wildcards):
    """One method's settings for the dataset and ipc; a missing per-ipc entry fails the DAG."""
    return hdconfig.method_config(
        config, wildcards.dataset, wildcards.method, int(wildcards.ipc)
    )


def check_ipc(wildcards):
    """ipc against the training patches per class, at DAG time when the store is built (else
    the distill job checks it first): one error naming the class and its count."""
    store = f"results/{wildcards.dataset}/patches.zarr"
    if not os.path.exists(f"{store}/zarr.json"):
        return
    from histodistill.data.store import PatchStore

    try:
        PatchStore(store).check_ipc(int(wildcards.ipc), "distill")
    except hdio.InputError as err:
        raise WorkflowError(str(err)) from None


def seed_of(wildcards):
    """The distillation seed of a target: distill.seed, or the one its _s<N> suffix names."""
    tag = wildcards.get("seed", "")
    return int(tag[2:]) if tag else section(wildcards.dataset, "distill")["seed"]


def seed_tags(name):
    """The seed suffixes of a dataset's distill.seeds seeds: "" (distill.seed), "_s<seed+1>"..."""
    dist = section(name, "distill")
    return [""] + [f"_s{dist['seed'] + k}" for k in range(1, dist["seeds"])]


def candidates(wildcards):
    """The declared grid of a method (tuning.candidates.<method>): overrides, possibly none."""
    return section(wildcards.dataset, "tuning")["candidates"].get(wildcards.method, [])


def candidate_cfg(wildcards):
    """One tuning candidate's settings: the method's, with the candidate's overrides."""
    grid = candidates(wildcards)
    k = int(wildcards.k)
    if k >= len(grid):
        raise WorkflowError(
            f"[tune_candidate] tuning.candidates.{wildcards.method} has {len(grid)} "
            f"candidates; c{k} does not exist"
        )
    return overridden_cfg(wildcards, grid[k])


def overridden_cfg(wildcards, overrides):
    """A method's settings with declared overrides (a tuning candidate, a study variant); a key
    the method does not have is an error naming it."""
    try:
        cfg = hdconfig.with_candidate(
            method_cfg(wildcards), overrides, wildcards.method
        )
    except hdconfig.ConfigError as err:
        raise WorkflowError(str(err)) from None
    return hdparams.without_operational(cfg)


def tuning_inputs(wildcards):
    """A tuned method's distill inputs: the choice and every candidate's set (none untuned)."""
    grid = candidates(wildcards)
    if not grid:
        return {}
    stem = f"results/{wildcards.dataset}/tuning/{wildcards.method}_ipc{wildcards.ipc}"
    return {
        "choice": f"{stem}.json",
        "candidates": [f"{stem}_c{k}.zarr" for k in range(len(grid))],
    }


def setting(name, key):
    """A function of the wildcards giving one setting of a stage, canonical, for ``params``."""
    return lambda wc: hdparams.canonical(section(wc.dataset, name)[key])


def library(script):
    """Hash of the library modules ``scripts/<script>`` imports: a param, so editing them reruns
    the rule (Snakemake's code trigger sees only the wrapper script)."""
    return hdparams.library_hash(Path(workflow.basedir) / "scripts" / script)


def full_results(wildcards):
    """The cached full-data upper bound of every evaluated architecture."""
    archs = section(wildcards.dataset, "evaluate")["archs"]
    return [f"results/{wildcards.dataset}/full/{arch}.json" for arch in archs]


def final_targets(name, stage=""):
    """Every result file the configured targets ask for, for one dataset (with ``stage``, e.g.
    "patch_eval/", that stage's file of each instead)."""
    t = config["targets"]
    return [
        f"results/{name}/{stage}{m}_ipc{i}.json" for m in t["methods"] for i in t["ipc"]
    ]


def profile_inputs(rule_name, names, files):
    """The inputs of a top-level target over the datasets ``names`` (the demos, whose settings
    are overlays in configs/). Asked for by name while one of them is not configured (its overlay
    not given with --configfile), the run stops here, before the DAG is built, with one line
    naming the overlay to add (a SystemExit: no traceback, unlike an error in the DAG).
    """
    missing = [n for n in names if n not in config["datasets"]]
    if missing and rule_name in sys.argv[1:]:
        raise SystemExit(f"Error: {hdconfig.not_configured(config, missing[0])}")
    return files


def encoder_cfg(name, encoder):
    """One encoder's settings for a dataset; an unknown name fails the DAG naming the key."""
    encoders = section(name, "encoders")
    if encoder not in encoders:
        raise WorkflowError(
            f"config key 'encoders.{encoder}' is not configured; encoders: {sorted(encoders)}"
        )
    return encoders[encoder]


def encoder_weights(wildcards):
    """The local weights file of a resnet50_trunc encoder (an input, so replacing it reruns)."""
    cfg = encoder_cfg(wildcards.dataset, wildcards.encoder)
    return [cfg["weights"]] if cfg.get("weights") else []


def result_parts(wildcards):
    """The files a result file joins, by section name. ``patch`` always; stages that
    evaluate a distilled set further add their section here."""
    stem = (
        f"results/{wildcards.dataset}/{{}}/{wildcards.method}_ipc{wildcards.ipc}.json"
    )
    parts = {"patch": stem.format("patch_eval"), "privacy": stem.format("privacy")}
    if hdconfig.dataset(config, wildcards.dataset)["format"] == "wsi" and (
        not hdcatalogue.get(wildcards.method).not_per_slide
    ):  # slide level: WSI datasets, methods that can distil one slide at a time
        parts["slide"] = stem.format("slide_eval")
    return parts


def privacy_encoder(wildcards):
    """The encoder of the privacy audit's feature space (none when privacy.encoder is null)."""
    name = section(wildcards.dataset, "privacy")["encoder"]
    if name is None:
        return []
    encoder_cfg(wildcards.dataset, name)  # an unknown name fails the DAG naming the key
    return [f"results/{wildcards.dataset}/encoders/{name}.pt"]
