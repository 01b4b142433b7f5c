# Inputs and settings of the slide-level rules (mil.smk): per-slide distillation jobs of
# mil.slides_per_job training slides each (named after their first slide, as tiling's), the
# feature bags they feed, and the settings each rule reads (canonical, for its params).
from types import SimpleNamespace as Namespace

from histodistill.slides.tiling import batches as slide_jobs


def mil_cfg(name):
    """The dataset's mil section; a model without settings fails the DAG naming the key."""
    try:
        return hdconfig.mil(config, name)
    except hdconfig.ConfigError as err:
        raise WorkflowError(str(err)) from None


def slide_method_cfg(wildcards):
    """The method's settings applied per slide; a method that cannot run per slide fails the
    DAG with one message naming it."""
    try:
        return hdconfig.slide_method_config(
            config, wildcards.dataset, wildcards.method, int(wildcards.ipc)
        )
    except hdconfig.ConfigError as err:
        raise WorkflowError(f"[distill_slides] {err}") from None


def slide_distill_jobs(wildcards):
    """Batch name -> names of the training slides of one distill_slides job."""
    slide_method_cfg(wildcards)
    train = [r for r in cohort_rows(wildcards.dataset) if r["split"] == "train"]
    jobs = slide_jobs(train, mil_cfg(wildcards.dataset)["slides_per_job"])
    return {b: [r["slide"] for r in rows] for b, rows in jobs.items()}


def slide_batch(wildcards):
    """The slide names of one distill_slides job; an unknown batch name is an error naming it."""
    jobs = slide_distill_jobs(wildcards)
    if wildcards.batch not in jobs:
        raise WorkflowError(
            f"[distill_slides] no job {wildcards.batch!r} for dataset "
            f"{wildcards.dataset!r} (jobs are named after their first slide: "
            f"{list(jobs)[:5]}...)"
        )
    return jobs[wildcards.batch]


def slide_distill_input(wildcards):
    """Store, stain template, the method's extra inputs (Histo-DD: its network pool) and for a
    tuned method its choice (the patch-level candidates' validation figures)."""
    slide_batch(wildcards)
    out = {
        "store": f"results/{wildcards.dataset}/patches.zarr",
        "template": f"results/{wildcards.dataset}/stain/template.json",
    }
    if candidates(wildcards):
        out["choice"] = tuning_inputs(wildcards)["choice"]
    return {**out, **extra_inputs(wildcards.dataset, wildcards.method)}


def slide_distilled(wildcards):
    """Every distill_slides output of a method and ipc (the per-slide synthetic sets)."""
    stem = f"results/{wildcards.dataset}/slide_distilled/{wildcards.method}_ipc{wildcards.ipc}"
    return [f"{stem}/{batch}" for batch in slide_distill_jobs(wildcards)]


def bag_input(wildcards):
    """The store and the encoder; synthetic bags also read the per-slide distilled sets."""
    out = {
        "store": f"results/{wildcards.dataset}/patches.zarr",
        "encoder": f"results/{wildcards.dataset}/encoders/{wildcards.encoder}.pt",
    }
    if wildcards.bags != "real":
        method, ipc = wildcards.bags.rsplit("_ipc", 1)
        wc = Namespace(dataset=wildcards.dataset, method=method, ipc=ipc)
        out["distilled"] = slide_distilled(wc)
    return out


def bags_dir(wildcards, bags):
    name = wildcards.dataset
    return f"results/{name}/bags/{mil_cfg(name)['encoder']}/{bags}"


def mil_input(wildcards):
    """Synthetic and real bags of the configured encoder, the store (class names) and the
    cached full-bag result of every evaluated model."""
    name, cfg = wildcards.dataset, mil_cfg(wildcards.dataset)
    return {
        "synthetic": bags_dir(wildcards, f"{wildcards.method}_ipc{wildcards.ipc}"),
        "real": bags_dir(wildcards, "real"),
        "store": f"results/{name}/patches.zarr",
        "full": [
            f"results/{name}/slide_full/{cfg['encoder']}/{m}.json"
            for m in cfg["models"]
        ],
    }


def mil_eval_settings(wildcards):
    """What evaluate_mil reads: models, their settings, runs, seed and the encoder's name."""
    cfg = mil_cfg(wildcards.dataset)
    return hdparams.canonical(
        {
            "models": cfg["models"],
            "settings": {m: cfg["settings"][m] for m in cfg["models"]},
            "runs": cfg["runs"],
            "seed": cfg["seed"],
            "encoder": cfg["encoder"],
        }
    )


def transfer_input(wildcards):
    """Store, template, the per-slide synthetic sets and both bag folders; a dataset whose
    training slides record fewer than two centres fails the DAG naming it."""
    name = wildcards.dataset
    found = {r["centre"] for r in cohort_rows(name) if r["split"] == "train"} - {-1}
    if len(found) < 2:
        raise WorkflowError(
            f"[transfer] dataset {name!r}: cross-centre transfer needs training slides of "
            f"two or more centres, the slide table records {sorted(found)} "
            f"(camelyon16 layout: datasets.{name}.centre_split)"
        )
    return {
        "store": f"results/{name}/patches.zarr",
        "template": f"results/{name}/stain/template.json",
        "distilled": slide_distilled(wildcards),
        "real": bags_dir(wildcards, "real"),
        "synthetic": bags_dir(wildcards, f"{wildcards.method}_ipc{wildcards.ipc}"),
    }


def transfer_settings(wildcards):
    """What transfer reads: mil.transfer, its MIL model's settings, and how evaluate trains a
    patch classifier (the arch's kwargs, augmentation, the method's stain protocol)."""
    cfg, ev = mil_cfg(wildcards.dataset), section(wildcards.dataset, "evaluate")
    arch = cfg["transfer"]["patch_arch"]
    return hdparams.canonical(
        {
            "transfer": cfg["transfer"],
            "model_settings": cfg["settings"][cfg["transfer"]["model"]],
            "arch_kwargs": ev["arch_kwargs"].get(arch, {}),
            "augment": ev["augment"],
            "stain_norm": hdparams.stain_protocol(ev, wildcards.method),
        }
    )
