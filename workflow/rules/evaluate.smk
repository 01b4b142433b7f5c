rule full_train:
    """Upper bound: one architecture trained once on the full real training set (cached)."""
    input:
        store="results/{dataset}/patches.zarr",
        template="results/{dataset}/stain/template.json",
    output:
        "results/{dataset}/full/{arch}.json",
    log:
        "logs/full_train/{dataset}/{arch}.log",
    benchmark:
        "benchmarks/full_train/{dataset}/{arch}.tsv"
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=lambda wc, attempt: 32000 * attempt,
        runtime=runtime(1440),
        gpu=1,
        cache_mb=setting("evaluate", "cache_mb"),
    params:
        evaluate=lambda wc: hdparams.full_train_settings(
            section(wc.dataset, "evaluate"), wc.arch
        ),
        checkpoint="results/{dataset}/full/{arch}.ckpt",
        code=library("full_train.py"),
    script:
        "../../scripts/full_train.py"


rule evaluate:
    """Train each configured architecture on the distilled set; test on the real test split."""
    input:
        distilled="results/{dataset}/distilled/{method}_ipc{ipc}{seed}.zarr",
        cost="results/{dataset}/distilled/{method}_ipc{ipc}{seed}_cost.json",
        store="results/{dataset}/patches.zarr",
        template="results/{dataset}/stain/template.json",
        full=full_results,
    output:
        "results/{dataset}/patch_eval/{method}_ipc{ipc}{seed}.json",
    log:
        "logs/evaluate/{dataset}/{method}_ipc{ipc}{seed}.log",
    benchmark:
        "benchmarks/evaluate/{dataset}/{method}_ipc{ipc}{seed}.tsv"
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=runtime(720),
        gpu=1,
        cache_mb=setting("evaluate", "cache_mb"),
    params:
        evaluate=lambda wc: hdparams.evaluate_settings(
            section(wc.dataset, "evaluate"), wc.method
        ),
        code=library("evaluate.py"),
    script:
        "../../scripts/evaluate.py"
