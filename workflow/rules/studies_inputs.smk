# Input and settings functions of the study rules (studies.smk): a set's variant, from the
# study's definition (histodistill/studies.py).
import histodistill.studies as hdstudies


def study_variant(wildcards):
    """The variant a study_set target names, checked against its study: the method and ipc in
    the file name must be the variant's."""
    try:
        study = hdstudies.get(wildcards.study)
    except ValueError as err:
        raise WorkflowError(str(err)) from None
    variant = study.variants.get(wildcards.variant)
    if (
        variant is None
        or variant.method != wildcards.method
        or study.ipc != int(wildcards.ipc)
    ):
        raise WorkflowError(
            f"[study_set] {wildcards.study} has no set {wildcards.method}_ipc{wildcards.ipc}_"
            f"{wildcards.variant}; its variants: {sorted(study.variants)} at ipc {study.ipc}"
        )
    return variant


def study_set_cfg(wildcards):
    """One study set's settings: the method's for the dataset, with the variant's overrides."""
    return overridden_cfg(wildcards, study_variant(wildcards).overrides)


def study_set_inputs(wildcards):
    """A study set's extra inputs (its method's catalogue row), once ipc is checked."""
    study_variant(wildcards)
    return method_inputs(wildcards)


def study_sets(wildcards):
    """Every set of a study on the dataset, seed by seed from distill.seed."""
    try:
        return hdstudies.set_paths(
            wildcards.dataset,
            wildcards.study,
            section(wildcards.dataset, "distill")["seed"],
        )
    except ValueError as err:
        raise WorkflowError(str(err)) from None
