# WSI datasets: slide table (checkpoint), one tiling job per slide batch, gather into the store.
# Input functions and helpers live in tile_inputs.smk.


checkpoint cohort:
    """Slide table of a WSI dataset: one row per slide with label, split, centre, annotation."""
    input:
        cohort_input,
    output:
        "results/{dataset}/slides.csv",
    log:
        "logs/cohort/{dataset}.log",
    benchmark:
        "benchmarks/cohort/{dataset}.tsv"
    wildcard_constraints:
        dataset=datasets_of(["wsi"]),
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=runtime(30),
    params:
        name=lambda wc: wc.dataset,
        dataset=lambda wc: hdparams.canonical(dataset_cfg(wc.dataset)),
        tiling=lambda wc: hdparams.canonical(
            {k: tiling_cfg(wc.dataset)[k] for k in CHECK_SETTINGS}
        ),
        code=library("cohort.py"),
    script:
        "../../scripts/cohort.py"


rule tile_slides:
    """Otsu mask, patch grid at the configured magnification, labels from XML: one store per
    slide of the batch, resumable slide by slide."""
    input:
        unpack(batch_input),
    output:
        directory("results/{dataset}/tiles/{batch}"),
    log:
        "logs/tile_slides/{dataset}/{batch}.log",
    benchmark:
        "benchmarks/tile_slides/{dataset}/{batch}.tsv"
    wildcard_constraints:
        dataset=datasets_of(["wsi"]),
        batch=r"[^/]+",
    conda:
        ENV
    threads: lambda wc: tiling_cfg(wc.dataset)["threads"]
    resources:
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=runtime(30, lambda wc: tiling_cfg(wc.dataset)["slides_per_job"]),
    params:
        rows=batch_rows,
        tiling=lambda wc: hdparams.canonical(slide_settings(tiling_cfg(wc.dataset))),
        classes=lambda wc: dataset_classes(wc.dataset, cohort_rows(wc.dataset)),
        code=library("tile_slides.py"),
    script:
        "../../scripts/tile_slides.py"


rule tile:
    """Gather the per-slide stores, in slide-table order, into the dataset's patch store."""
    input:
        gather_input,
    output:
        directory("results/{dataset}/patches.zarr"),
    log:
        "logs/tile/{dataset}.log",
    benchmark:
        "benchmarks/tile/{dataset}.tsv"
    wildcard_constraints:
        dataset=datasets_of(["wsi"]),
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=runtime(120),
    params:
        rows=lambda wc: cohort_rows(wc.dataset),
        tiling=lambda wc: hdparams.canonical(store_settings(tiling_cfg(wc.dataset))),
        classes=lambda wc: dataset_classes(wc.dataset, cohort_rows(wc.dataset)),
        code=library("tile.py"),
    script:
        "../../scripts/tile.py"


rule ingest:
    """Pre-tiled datasets (ImageFolder, MedMNIST npz, label CSV) into the same zarr layout."""
    input:
        ingest_input,
    output:
        directory("results/{dataset}/patches.zarr"),
    log:
        "logs/ingest/{dataset}.log",
    benchmark:
        "benchmarks/ingest/{dataset}.tsv"
    wildcard_constraints:
        dataset=datasets_of(["imagefolder", "npz", "csv"]),
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=runtime(120),
    params:
        name=lambda wc: wc.dataset,
        dataset=lambda wc: hdparams.canonical(dataset_cfg(wc.dataset)),
        code=library("ingest.py"),
    script:
        "../../scripts/ingest.py"
