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
        runtime=runtime(240),
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
    """Distil ipc synthetic (or coreset) patches per class with the method in the target name;
    a tuned method takes its chosen candidate's settings (and, at distill.seed, its set).
    """
    input:
        unpack(method_inputs),
        unpack(tuning_inputs),
        store="results/{dataset}/patches.zarr",
        template="results/{dataset}/stain/template.json",
    output:
        zarr=directory("results/{dataset}/distilled/{method}_ipc{ipc}{seed}.zarr"),
        cost="results/{dataset}/distilled/{method}_ipc{ipc}{seed}_cost.json",
        grid=report(
            "results/{dataset}/distilled/{method}_ipc{ipc}{seed}.png",
            caption="../report/distilled.rst",
            category="Distilled sets",
            labels={
                "dataset": "{dataset}",
                "method": "{method}",
                "ipc": "{ipc}{seed}",
            },
        ),
    log:
        "logs/distill/{dataset}/{method}_ipc{ipc}{seed}.log",
    benchmark:
        "benchmarks/distill/{dataset}/{method}_ipc{ipc}{seed}.tsv"
    wildcard_constraints:
        method="|".join(DISTILL_METHODS),
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
        cfg=lambda wc: hdparams.without_operational(method_cfg(wc)),
        seed=seed_of,
        tuned_seed=setting("distill", "seed"),
        max_per_class=setting("distill", "max_real_per_class"),
        checkpoint="results/{dataset}/distilled/{method}_ipc{ipc}{seed}.ckpt",
        candidate="results/{dataset}/tuning/{method}_ipc{ipc}_c",
        code=library("distill.py"),
    script:
        "../../scripts/distill.py"


rule tune_candidate:
    """One candidate of a method's declared grid (tuning.candidates): distilled at the method's
    budget with distill.seed, trained on and tested on the validation split, never on test.
    """
    input:
        unpack(method_inputs),
        store="results/{dataset}/patches.zarr",
        template="results/{dataset}/stain/template.json",
    output:
        zarr=directory("results/{dataset}/tuning/{method}_ipc{ipc}_c{k}.zarr"),
        cost="results/{dataset}/tuning/{method}_ipc{ipc}_c{k}_cost.json",
        grid="results/{dataset}/tuning/{method}_ipc{ipc}_c{k}.png",
        json="results/{dataset}/tuning/{method}_ipc{ipc}_c{k}.json",
    log:
        "logs/tune_candidate/{dataset}/{method}_ipc{ipc}_c{k}.log",
    benchmark:
        "benchmarks/tune_candidate/{dataset}/{method}_ipc{ipc}_c{k}.tsv"
    wildcard_constraints:
        method="|".join(DISTILL_METHODS),
        k=r"\d+",
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
        cfg=candidate_cfg,
        overrides=lambda wc: hdparams.canonical(candidates(wc)[int(wc.k)]),
        seed=setting("distill", "seed"),
        max_per_class=setting("distill", "max_real_per_class"),
        checkpoint="results/{dataset}/tuning/{method}_ipc{ipc}_c{k}.ckpt",
        evaluate=lambda wc: hdparams.tuning_settings(
            section(wc.dataset, "evaluate"), section(wc.dataset, "tuning"), wc.method
        ),
        code=library("tune_candidate.py"),
    script:
        "../../scripts/tune_candidate.py"


rule tune:
    """A method's setting: the candidate with the best validation accuracy."""
    input:
        lambda wc: [
            f"results/{wc.dataset}/tuning/{wc.method}_ipc{wc.ipc}_c{k}.json"
            for k in range(len(candidates(wc)))
        ],
    output:
        "results/{dataset}/tuning/{method}_ipc{ipc}.json",
    log:
        "logs/tune/{dataset}/{method}_ipc{ipc}.log",
    wildcard_constraints:
        method="|".join(DISTILL_METHODS),
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        max_saturated=setting("tuning", "max_saturated"),
        code=library("tune.py"),
    script:
        "../../scripts/tune.py"


rule seeds:
    """A method's figures over distill.seeds distillation seeds (mean and std over seeds)."""
    input:
        lambda wc: [
            f"results/{wc.dataset}/patch_eval/{wc.method}_ipc{wc.ipc}{tag}.json"
            for tag in seed_tags(wc.dataset)
        ],
    output:
        "results/{dataset}/seeds/{method}_ipc{ipc}.json",
    log:
        "logs/seeds/{dataset}/{method}_ipc{ipc}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        seeds=lambda wc: [
            section(wc.dataset, "distill")["seed"] + k
            for k in range(section(wc.dataset, "distill")["seeds"])
        ],
        code=library("seeds.py"),
    script:
        "../../scripts/seeds.py"
