rule pretrain_pool:
    """Histo-DD's pool: networks pre-trained on the real data from different initialisations."""
    input:
        store="results/{dataset}/patches.zarr",
        template="results/{dataset}/stain/template.json",
    output:
        "results/{dataset}/pool.pt",
    log:
        "logs/pretrain_pool/{dataset}.log",
    benchmark:
        "benchmarks/pretrain_pool/{dataset}.tsv"
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=lambda wc, attempt: 240 * attempt,
        gpu=1,
        cache_mb=setting("distill", "cache_mb"),
    params:
        pool=setting("distill", "pool"),
        seed=setting("distill", "seed"),
        max_per_class=setting("distill", "max_real_per_class"),
        code=library("pretrain_pool.py"),
    script:
        "../../scripts/pretrain_pool.py"


rule distill:
    """Distil ipc synthetic (or coreset) patches per class with the method in the target name."""
    input:
        unpack(method_inputs),
        store="results/{dataset}/patches.zarr",
        template="results/{dataset}/stain/template.json",
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
        "logs/distill/{dataset}/{method}_ipc{ipc}.log",
    benchmark:
        "benchmarks/distill/{dataset}/{method}_ipc{ipc}.tsv"
    wildcard_constraints:
        method="|".join(DISTILL_METHODS),
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=lambda wc, attempt: 32000 * attempt,
        runtime=lambda wc, attempt: 2880 * attempt,
        gpu=1,
        cache_mb=setting("distill", "cache_mb"),
        checkpoint_every=lambda wc: method_cfg(wc)["checkpoint_every"],
    params:
        cfg=lambda wc: hdparams.without_operational(method_cfg(wc)),
        seed=setting("distill", "seed"),
        max_per_class=setting("distill", "max_real_per_class"),
        checkpoint="results/{dataset}/distilled/{method}_ipc{ipc}.ckpt",
        code=library("distill.py"),
    script:
        "../../scripts/distill.py"
