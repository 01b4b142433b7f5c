# Input functions of the selection stages (workflow/rules/select.smk).


def select_cfg(wildcards):
    """One selection method's settings for the dataset; an unconfigured one fails the DAG."""
    methods = section(wildcards.dataset, "select")["methods"]
    if wildcards.method not in methods:
        raise WorkflowError(
            f"config key 'select.methods.{wildcards.method}' is not configured; "
            f"configured: {sorted(methods)}"
        )
    return methods[wildcards.method]


def select_pool(wildcards):
    """The store a method selects from: a synthetic store or the real patches."""
    cfg = select_cfg(wildcards)
    if cfg["source"] == "real":
        return f"results/{wildcards.dataset}/patches.zarr"
    return f"results/{wildcards.dataset}/synthetic/{cfg['generator']}.zarr"


def select_encoder(wildcards):
    """The feature encoder, when the method compares images in its feature space."""
    cfg = select_cfg(wildcards)
    uses = cfg["selector"] == "centroid" or (
        cfg["selector"] == "infodist"
        and (cfg["embedding"] == "encoder" or cfg["umap"]["input"] == "encoder")
    )
    name = section(wildcards.dataset, "select")["encoder"]
    return [f"results/{wildcards.dataset}/encoders/{name}.pt"] if uses else []


def study_encoder(wildcards):
    """The augmentation study always needs the encoder (the FID of the added images)."""
    name = section(wildcards.dataset, "select")["encoder"]
    return f"results/{wildcards.dataset}/encoders/{name}.pt"
