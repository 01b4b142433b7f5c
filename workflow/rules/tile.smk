rule cohort:
    """Slide table of a WSI dataset: one row per slide with label, split, centre, annotation."""
    input:
        cohort_input,
    output:
        "results/{dataset}/slides.csv",
    params:
        name=lambda wc: wc.dataset,
        dataset=lambda wc: dataset_cfg(wc.dataset),
    wildcard_constraints:
        dataset=datasets_of(["wsi"]),
    log:
        "logs/cohort/{dataset}.log",
    benchmark:
        "benchmarks/cohort/{dataset}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        ENV
    script:
        "../../scripts/cohort.py"


rule tile:
    """Otsu mask, patch grid at the configured magnification, labels from XML, zarr store."""
    input:
        "results/{dataset}/slides.csv",
    output:
        directory("results/{dataset}/patches.zarr"),
    params:
        tiling=lambda wc: tiling_cfg(wc.dataset),
        classes=lambda wc: dataset_cfg(wc.dataset).get("classes"),
    wildcard_constraints:
        dataset=datasets_of(["wsi"]),
    log:
        "logs/tile/{dataset}.log",
    benchmark:
        "benchmarks/tile/{dataset}.tsv"
    threads: lambda wc: tiling_cfg(wc.dataset)["threads"]
    resources:
        mem_mb=8000,
        runtime=240,
    conda:
        ENV
    script:
        "../../scripts/tile.py"


rule ingest:
    """Pre-tiled datasets (ImageFolder, MedMNIST npz, label CSV) into the same zarr layout."""
    input:
        ingest_input,
    output:
        directory("results/{dataset}/patches.zarr"),
    params:
        name=lambda wc: wc.dataset,
        dataset=lambda wc: dataset_cfg(wc.dataset),
    wildcard_constraints:
        dataset=datasets_of(["imagefolder", "npz", "csv"]),
    log:
        "logs/ingest/{dataset}.log",
    benchmark:
        "benchmarks/ingest/{dataset}.tsv"
    threads: 1
    resources:
        mem_mb=16000,
        runtime=120,
    conda:
        ENV
    script:
        "../../scripts/ingest.py"
