rule train_encoder:
    """A feature encoder trained on the real training patches (or loaded from a local weights
    file): the feature space of generator quality, selection, privacy audit and MIL bags.
    """
    input:
        store="results/{dataset}/patches.zarr",
        weights=encoder_weights,
    output:
        "results/{dataset}/encoders/{encoder}.pt",
    log:
        "logs/train_encoder/{dataset}/{encoder}.log",
    benchmark:
        "benchmarks/train_encoder/{dataset}/{encoder}.tsv"
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=runtime(720),
        gpu=1,
        cache_mb=setting("evaluate", "cache_mb"),
    params:
        encoder=lambda wc: hdparams.canonical(encoder_cfg(wc.dataset, wc.encoder)),
        checkpoint="results/{dataset}/encoders/{encoder}.ckpt",
        code=library("train_encoder.py"),
    script:
        "../../scripts/train_encoder.py"
