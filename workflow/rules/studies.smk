# Method studies (histodistill/studies.py): each variant distilled with the dataset's settings
# plus its overrides and evaluated on the validation split, never on test; the study's summary
# and figure file (results/<dataset>/studies/<study>.txt) are what the docs quote.


rule study_set:
    """One set of a study: a method with the variant's overrides, at the study's ipc and one
    seed, evaluated on the validation split as a tuning candidate is.
    """
    input:
        unpack(study_set_inputs),
        store="results/{dataset}/patches.zarr",
        template="results/{dataset}/stain/template.json",
    output:
        zarr=temp(
            directory(
                "results/{dataset}/studies/{study}/{method}_ipc{ipc}_{variant}_s{n}.zarr"
            )
        ),
        cost="results/{dataset}/studies/{study}/{method}_ipc{ipc}_{variant}_s{n}_cost.json",
        grid="results/{dataset}/studies/{study}/{method}_ipc{ipc}_{variant}_s{n}.png",
        json="results/{dataset}/studies/{study}/{method}_ipc{ipc}_{variant}_s{n}.json",
    log:
        "logs/study_set/{dataset}/{study}/{method}_ipc{ipc}_{variant}_s{n}.log",
    benchmark:
        "benchmarks/study_set/{dataset}/{study}/{method}_ipc{ipc}_{variant}_s{n}.tsv"
    wildcard_constraints:
        study=r"[a-z0-9_]+",
        method="|".join(DISTILL_METHODS),
        variant=r"[a-z0-9_]+",
        n=r"\d+",
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=lambda wc, attempt: 32000 * attempt,
        runtime=runtime(2880),
        gpu=1,
        cache_mb=setting("distill", "cache_mb"),
        checkpoint_every=lambda wc: method_cfg(wc)["checkpoint_every"],
    params:
        cfg=study_set_cfg,
        overrides=lambda wc: hdparams.canonical(study_variant(wc).overrides),
        seed=lambda wc: int(wc.n),
        max_per_class=setting("distill", "max_real_per_class"),
        checkpoint="results/{dataset}/studies/{study}/{method}_ipc{ipc}_{variant}_s{n}.ckpt",
        evaluate=lambda wc: hdparams.study_settings(
            section(wc.dataset, "evaluate"),
            wc.method,
            both_protocols=hdstudies.get(wc.study).both_protocols,
        ),
        code=library("tune_candidate.py"),
    script:
        "../../scripts/tune_candidate.py"


rule study:
    """A study's summary and figures from its sets (results/<dataset>/studies/<study>.json
    and .txt)."""
    input:
        study_sets,
    output:
        json="results/{dataset}/studies/{study}.json",
        figures="results/{dataset}/studies/{study}.txt",
    log:
        "logs/study/{dataset}/{study}.log",
    wildcard_constraints:
        study=r"[a-z0-9_]+",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=library("study.py"),
    script:
        "../../scripts/study.py"
