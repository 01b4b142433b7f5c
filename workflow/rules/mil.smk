# Slide-level evaluation of WSI datasets (README: slide level): per-slide distillation jobs, feature
# bags, MIL models on synthetic against full bags, cross-centre transfer. Inputs: mil_inputs.smk.


rule distill_slides:
    """The target's method applied to each training slide of one job separately: at most ipc
    synthetic patches per class on the slide, resumable slide by slide."""
    input:
        unpack(slide_distill_input),
    output:
        directory("results/{dataset}/slide_distilled/{method}_ipc{ipc}/{batch}"),
    log:
        "logs/distill_slides/{dataset}/{method}_ipc{ipc}/{batch}.log",
    benchmark:
        "benchmarks/distill_slides/{dataset}/{method}_ipc{ipc}/{batch}.tsv"
    wildcard_constraints:
        dataset=datasets_of(["wsi"]),
        batch=r"[^/]+",
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=runtime(120, lambda wc: mil_cfg(wc.dataset)["slides_per_job"]),
        gpu=1,
        cache_mb=setting("distill", "cache_mb"),
        checkpoint_every=lambda wc: slide_method_cfg(wc)["checkpoint_every"],
    params:
        cfg=lambda wc: hdparams.without_operational(slide_method_cfg(wc)),
        seed=setting("distill", "seed"),
        slides=slide_batch,
        per_slide=lambda wc: hdparams.canonical(
            mil_cfg(wc.dataset)["distill"].get(wc.method, {})
        ),
        code=library("distill_slides.py"),
    script:
        "../../scripts/distill_slides.py"


rule extract_features:
    """Feature bags (one HDF5 file per slide, CLAM's layout) of the real slides or of the
    per-slide synthetic sets of a method and ipc, streamed slide by slide."""
    input:
        unpack(bag_input),
    output:
        directory("results/{dataset}/bags/{encoder}/{bags}"),
    log:
        "logs/extract_features/{dataset}/{encoder}/{bags}.log",
    benchmark:
        "benchmarks/extract_features/{dataset}/{encoder}/{bags}.tsv"
    wildcard_constraints:
        dataset=datasets_of(["wsi"]),
        bags=r"real|[a-z]+_ipc\d+",
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=runtime(240),
        gpu=1,
        batch=lambda wc: mil_cfg(wc.dataset)["batch"],
    params:
        code=library("extract_features.py"),
    script:
        "../../scripts/extract_features.py"


rule full_mil:
    """Upper bound of one MIL model: trained on every real training bag, tested on the real
    test slides (cached per encoder and model)."""
    input:
        bags="results/{dataset}/bags/{encoder}/real",
        store="results/{dataset}/patches.zarr",
    output:
        "results/{dataset}/slide_full/{encoder}/{model}.json",
    log:
        "logs/full_mil/{dataset}/{encoder}/{model}.log",
    benchmark:
        "benchmarks/full_mil/{dataset}/{encoder}/{model}.tsv"
    wildcard_constraints:
        dataset=datasets_of(["wsi"]),
        model="|".join(["clam_sb", "clam_mb", "dsmil", "transmil"]),
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=runtime(720),
        gpu=1,
        cache_mb=lambda wc: mil_cfg(wc.dataset)["cache_mb"],
    params:
        settings=lambda wc: hdparams.canonical(
            mil_cfg(wc.dataset)["settings"][wc.model]
        ),
        runs=lambda wc: mil_cfg(wc.dataset)["runs"],
        seed=lambda wc: mil_cfg(wc.dataset)["seed"],
        code=library("full_mil.py"),
    script:
        "../../scripts/full_mil.py"


rule evaluate_mil:
    """Every configured MIL model trained on the synthetic bags, tested on the real test slides,
    beside its full-bag result: the `slide` section of the result file."""
    input:
        unpack(mil_input),
    output:
        "results/{dataset}/slide_eval/{method}_ipc{ipc}.json",
    log:
        "logs/evaluate_mil/{dataset}/{method}_ipc{ipc}.log",
    benchmark:
        "benchmarks/evaluate_mil/{dataset}/{method}_ipc{ipc}.tsv"
    wildcard_constraints:
        dataset=datasets_of(["wsi"]),
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=runtime(720),
        gpu=1,
        cache_mb=lambda wc: mil_cfg(wc.dataset)["cache_mb"],
    params:
        mil=mil_eval_settings,
        code=library("evaluate_mil.py"),
    script:
        "../../scripts/evaluate_mil.py"


rule transfer:
    """Cross-centre transfer: a patch classifier and a MIL model pre-trained on one centre,
    fine-tuned on the other's synthetic or full data, both directions."""
    input:
        unpack(transfer_input),
    output:
        "results/{dataset}/transfer_{method}_ipc{ipc}.json",
    log:
        "logs/transfer/{dataset}/{method}_ipc{ipc}.log",
    benchmark:
        "benchmarks/transfer/{dataset}/{method}_ipc{ipc}.tsv"
    wildcard_constraints:
        dataset=datasets_of(["wsi"]),
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=runtime(720),
        gpu=1,
        cache_mb=lambda wc: mil_cfg(wc.dataset)["cache_mb"],
    params:
        cfg=transfer_settings,
        code=library("transfer.py"),
    script:
        "../../scripts/transfer.py"
