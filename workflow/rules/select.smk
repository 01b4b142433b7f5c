# Selection from a pool: InfoDist, HistoDiffusion's centroid selection, random synthetic images
# (rule select, written like a distilled set), and HistoDiffusion's augmentation study.


rule select:
    """Choose ipc images per class from a pool with the selector of the method in the target name."""
    input:
        pool=select_pool,
        store="results/{dataset}/patches.zarr",
        encoder=select_encoder,
    output:
        zarr=directory("results/{dataset}/distilled/{method}_ipc{ipc}.zarr"),
        cost="results/{dataset}/distilled/{method}_ipc{ipc}_cost.json",
        grid=report(
            "results/{dataset}/distilled/{method}_ipc{ipc}.png",
            caption="../report/distilled.rst",
            category="Distilled sets",
            labels={"dataset": "{dataset}", "method": "{method}", "ipc": "{ipc}"},
        ),
    log:
        "logs/select/{dataset}/{method}_ipc{ipc}.log",
    benchmark:
        "benchmarks/select/{dataset}/{method}_ipc{ipc}.tsv"
    wildcard_constraints:
        method="|".join(SELECT_METHODS),
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=runtime(120),
    params:
        cfg=lambda wc: hdparams.canonical(select_cfg(wc)),
        seed=setting("select", "seed"),
        code=library("select.py"),
    script:
        "../../scripts/select.py"


rule augment_study:
    """HistoDiffusion's Table 1: a small real subset plus selected synthetic images at ratios."""
    input:
        pool=select_pool,
        store="results/{dataset}/patches.zarr",
        encoder=study_encoder,
        template="results/{dataset}/stain/template.json",
    output:
        "results/{dataset}/augment_{method}.json",
    log:
        "logs/augment_study/{dataset}/{method}.log",
    benchmark:
        "benchmarks/augment_study/{dataset}/{method}.tsv"
    wildcard_constraints:
        method="|".join(SELECT_METHODS),
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=runtime(720),
        gpu=1,
        cache_mb=setting("select", "cache_mb"),
    params:
        cfg=lambda wc: hdparams.canonical(select_cfg(wc)),
        study=setting("select", "augment_study"),
        seed=setting("select", "seed"),
        code=library("augment_study.py"),
    script:
        "../../scripts/augment_study.py"
