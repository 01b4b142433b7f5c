# WSI datasets: slide table (checkpoint), one tiling job per slide batch, gather into the store.
# Raw data are inputs: label tables and a listing of slide/annotation names feed the cohort
# rule, each slide and its annotation feed its own tiling job, so replacing one slide reruns
# only its job, the gather and what follows.
import histodistill.sources as hdsources
from histodistill.cohort import build_table, read_table
from histodistill.tiling import CHECK_SETTINGS, batches, check_cohort, class_names, slide_settings


def dataset_classes(name, rows):
    """The dataset's class names (configured, else the slide labels plus the tumour class)."""
    return class_names(rows, tiling_cfg(name), dataset_cfg(name).get("classes"))


def cohort_input(wildcards):
    """The generated demo cohort for synthetic datasets. A real root is read and checked here,
    before any job is queued (slide table, slides open, annotations, labels); its label tables
    and a listing of its slide and annotation files are the inputs."""
    name = wildcards.dataset
    ds = hdconfig.dataset(config, name)
    if ds.get("synthetic"):
        return [ds["root"]]
    rows = build_table(name, ds)
    check_cohort(name, rows, tiling_cfg(name), dataset_classes(name, rows))
    listing = hdsources.write_if_changed(f"results/{name}/sources/cohort.txt",
                                         hdsources.cohort_listing(rows))
    return hdsources.cohort_tables(name, ds) + [listing]


def cohort_rows(name):
    """The slide table written by the cohort checkpoint (the DAG waits for it)."""
    return read_table(checkpoints.cohort.get(dataset=name).output[0])


def slide_batches(name):
    """Batch name -> slide rows (each with its table index) of the dataset's tiling jobs."""
    return batches(cohort_rows(name), tiling_cfg(name)["slides_per_job"])


def batch_rows(wildcards):
    return slide_batches(wildcards.dataset)[wildcards.batch]


def batch_input(wildcards):
    """A tiling job reads its slide files and their annotations."""
    rows = batch_rows(wildcards)
    return {"slides": [r["path"] for r in rows],
            "annotations": [r["annotation"] for r in rows if r["annotation"]]}


def gather_input(wildcards):
    name = wildcards.dataset
    return [f"results/{name}/tiles/{batch}" for batch in slide_batches(name)]


def store_settings(name):
    """Tiling settings recorded in the store (not threads or job size: they change no patch)."""
    return {k: v for k, v in tiling_cfg(name).items() if k not in ("threads", "slides_per_job")}


def ingest_input(wildcards):
    """The source files an ingest job reads; large file sets as a listing written here."""
    name = wildcards.dataset
    files, listing = hdsources.ingest_inputs(name, hdconfig.dataset(config, name))
    if listing is not None:
        files.append(hdsources.write_if_changed(f"results/{name}/sources/ingest.txt", listing))
    return files


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
        tiling=lambda wc: store_settings(wc.dataset),
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
