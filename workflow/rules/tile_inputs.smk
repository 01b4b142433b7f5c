# Inputs of the WSI and ingest rules (tile.smk). Raw data are inputs: label tables and a listing
# of slide/annotation names feed the cohort rule, each slide and its annotation feed its own
# tiling job, so replacing one slide reruns only its job, the gather and what follows.
import histodistill.slides.sources as hdsources
from histodistill.slides.cohort import build_table, read_table
from histodistill.slides.tiling import (
    CHECK_SETTINGS,
    batches,
    check_cohort,
    class_names,
    slide_settings,
    store_settings,
)


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
    check_cohort(
        name,
        rows,
        tiling_cfg(name),
        class_names=dataset_classes(name, rows),
        unannotated=ds.get("unannotated_slides", ()),
    )
    listing = hdsources.listing_input(
        f"results/{name}/sources/cohort.txt",
        hdsources.cohort_listing(rows),
        workflow.dryrun,
    )
    return hdsources.cohort_tables(name, ds) + [listing]


def cohort_rows(name):
    """The slide table written by the cohort checkpoint (the DAG waits for it)."""
    return read_table(checkpoints.cohort.get(dataset=name).output[0])


def slide_batches(name):
    """Batch name -> slide rows (each with its table index) of the dataset's tiling jobs."""
    return batches(cohort_rows(name), tiling_cfg(name)["slides_per_job"])


def batch_rows(wildcards):
    """The slide rows of one tiling job; an unknown batch name is an error naming it."""
    jobs = slide_batches(wildcards.dataset)
    if wildcards.batch not in jobs:
        raise WorkflowError(
            f"[tile] results/{wildcards.dataset}/tiles/{wildcards.batch}: no such "
            f"batch (batches are named after their first slide: {list(jobs)[:5]}...)"
        )
    return jobs[wildcards.batch]


def batch_input(wildcards):
    """A tiling job reads its slide files and their annotations."""
    rows = batch_rows(wildcards)
    return {
        "slides": [r["path"] for r in rows],
        "annotations": [r["annotation"] for r in rows if r["annotation"]],
    }


def gather_input(wildcards):
    name = wildcards.dataset
    return [f"results/{name}/tiles/{batch}" for batch in slide_batches(name)]


def ingest_input(wildcards):
    """The source files an ingest job reads; large file sets as a listing written here."""
    name = wildcards.dataset
    try:
        files, listing = hdsources.ingest_inputs(name, hdconfig.dataset(config, name))
    except hdio.InputError as err:  # a bad label CSV: one message, no traceback
        raise WorkflowError(str(err)) from None
    if listing is not None:
        files.append(
            hdsources.listing_input(
                f"results/{name}/sources/ingest.txt", listing, workflow.dryrun
            )
        )
    return files
