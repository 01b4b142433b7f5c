rule pretrain_pool:
    """Histo-DD's pool: networks pre-trained on the real data from different initialisations."""
    input:
        "results/{dataset}/patches.zarr",
    output:
        "results/{dataset}/pool.pt",
    params:
        pool=lambda wc: section(wc.dataset, "distill")["pool"],
        seed=lambda wc: section(wc.dataset, "distill")["seed"],
        max_per_class=lambda wc: section(wc.dataset, "distill")["max_real_per_class"],
        cache_mb=lambda wc: section(wc.dataset, "distill")["cache_mb"],
    log:
        "logs/pretrain_pool/{dataset}.log",
    benchmark:
        "benchmarks/pretrain_pool/{dataset}.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=GPU,
    conda:
        ENV
    script:
        "../../scripts/pretrain_pool.py"


rule distill:
    """Distil ipc synthetic (or coreset) patches per class with the method in the target name."""
    input:
        store="results/{dataset}/patches.zarr",
        template="results/{dataset}/stain/template.json",
        pool=lambda wc: ["results/{dataset}/pool.pt"] if wc.method == "histodd" else [],
    output:
        zarr=directory("results/{dataset}/distilled/{method}_ipc{ipc}.zarr"),
        cost="results/{dataset}/distilled/{method}_ipc{ipc}_cost.json",
        grid=report(
            "results/{dataset}/distilled/{method}_ipc{ipc}.png",
            caption="../report/distilled.rst",
            category="Distilled sets",
            labels={"dataset": "{dataset}", "method": "{method}", "ipc": "{ipc}"},
        ),
    params:
        cfg=method_cfg,
        seed=lambda wc: section(wc.dataset, "distill")["seed"],
        max_per_class=lambda wc: section(wc.dataset, "distill")["max_real_per_class"],
        cache_mb=lambda wc: section(wc.dataset, "distill")["cache_mb"],
        checkpoint="results/{dataset}/distilled/{method}_ipc{ipc}.ckpt",
    log:
        "logs/distill/{dataset}/{method}_ipc{ipc}.log",
    benchmark:
        "benchmarks/distill/{dataset}/{method}_ipc{ipc}.tsv"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=1440,
        gpu=GPU,
    conda:
        ENV
    script:
        "../../scripts/distill.py"
