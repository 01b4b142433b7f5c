# Input functions of the generator stages (workflow/rules/generate.smk).


def pretrain_stores(wildcards):
    """Patch stores pooled for the autoencoder and the unconditional generator."""
    names = section(wildcards.dataset, "generate")["pretrain"]
    for name in names:
        hdconfig.dataset(
            config, name
        )  # an unknown name fails the DAG with the configured list
    return [
        f"results/{name}/patches.zarr" for name in names if name != wildcards.dataset
    ]


def generator_files(wildcards):
    """The model files each generator samples with."""
    base = f"results/{wildcards.dataset}/generate"
    files = {"autoencoder": f"{base}/autoencoder.pt"}
    if wildcards.generator == "uvit":
        return {**files, "uvit": f"{base}/uvit_cond.pt"}
    return {
        **files,
        "uvit": f"{base}/uvit_uncond.pt",
        "decoder": f"{base}/decoder_ft.pt",
        "classifier": f"{base}/latent_classifier.pt",
    }
