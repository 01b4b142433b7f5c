# WSI datasets: slide table (checkpoint), one tiling job per slide batch, gather into the store.
# Input functions and helpers live in tile_inputs.smk.

checkpoint cohort:
    """Slide table of a WSI dataset: one row per slide with label, split, centre, annotation."""
    input:
        cohort_input,
    output:
        "results/{dataset}/slides.csv",
    params:
        name=lambda wc: wc.dataset,
        dataset=lambda wc: dataset_cfg(wc.dataset),
        tiling=lambda wc: {k: tiling_cfg(wc.dataset)[k] for k in CHECK_SETTINGS},
    wildcard_constraints:
        dataset=datasets_of(["wsi"]),
    log:
        "logs/cohort/{dataset}.log",
    benchmark:
        "benchmarks/cohort/{dataset}.tsv"
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=lambda wc, attempt: 30 * attempt,
    conda:
        ENV
    script:
        "../../scripts/cohort.py"


rule tile_slides:
    """Otsu mask, patch grid at the configured magnification, labels from XML: one store per
    slide of the batch, resumable slide by slide."""
    input:
        unpack(batch_input),
    output:
        directory("results/{dataset}/tiles/{batch}"),
    params:
        rows=batch_rows,
        tiling=lambda wc: slide_settings(tiling_cfg(wc.dataset)),
        classes=lambda wc: dataset_classes(wc.dataset, cohort_rows(wc.dataset)),
    wildcard_constraints:
        dataset=datasets_of(["wsi"]),
        batch=r"[^/]+",
    log:
        "logs/tile_slides/{dataset}/{batch}.log",
    benchmark:
        "benchmarks/tile_slides/{dataset}/{batch}.tsv"
    threads: lambda wc: tiling_cfg(wc.dataset)["threads"]
    resources:
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 30 * tiling_cfg(wc.dataset)["slides_per_job"] * attempt,
    conda:
        ENV
    script:
        "../../scripts/tile_slides.py"


rule tile:
    """Gather the per-slide stores, in slide-table order, into the dataset's patch store."""
    input:
        gather_input,
    output:
        directory("results/{dataset}/patches.zarr"),
    params:
        rows=lambda wc: cohort_rows(wc.dataset),
        tiling=lambda wc: store_settings(tiling_cfg(wc.dataset)),
        classes=lambda wc: dataset_classes(wc.dataset, cohort_rows(wc.dataset)),
    wildcard_constraints:
        dataset=datasets_of(["wsi"]),
    log:
        "logs/tile/{dataset}.log",
    benchmark:
        "benchmarks/tile/{dataset}.tsv"
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
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
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    conda:
        ENV
    script:
        "../../scripts/ingest.py"
