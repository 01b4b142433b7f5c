# Generator stages: latent autoencoder, U-ViT latent diffusion (cond: InfoDist, class-conditional
# with classifier-free guidance; uncond: HistoDiffusion's pre-training), HistoDiffusion's decoder
# fine-tuning and latent classifier, synthetic sampling and its quality.


wildcard_constraints:
    mode="cond|uncond",
    generator="uvit|histodiffusion",


rule train_autoencoder:
    """LDM's KL-regularised autoencoder on the training split (and pooled stores)."""
    input:
        store="results/{dataset}/patches.zarr",
        pretrain=pretrain_stores,
    output:
        "results/{dataset}/generate/autoencoder.pt",
    log:
        "logs/train_autoencoder/{dataset}.log",
    benchmark:
        "benchmarks/train_autoencoder/{dataset}.tsv"
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=runtime(1440),
        gpu=1,
        cache_mb=setting("generate", "cache_mb"),
        checkpoint_every=setting("generate", "checkpoint_every"),
    params:
        autoencoder=setting("generate", "autoencoder"),
        seed=setting("generate", "seed"),
        checkpoint="results/{dataset}/generate/autoencoder.ckpt",
        code=library("train_autoencoder.py"),
    script:
        "../../scripts/train_autoencoder.py"


rule train_generator:
    """U-ViT latent diffusion: class-conditional (cond) or unconditional on pooled stores (uncond)."""
    input:
        store="results/{dataset}/patches.zarr",
        autoencoder="results/{dataset}/generate/autoencoder.pt",
        pretrain=lambda wc: pretrain_stores(wc) if wc.mode == "uncond" else [],
    output:
        "results/{dataset}/generate/uvit_{mode}.pt",
    log:
        "logs/train_generator/{dataset}/{mode}.log",
    benchmark:
        "benchmarks/train_generator/{dataset}/{mode}.tsv"
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=lambda wc, attempt: 32000 * attempt,
        runtime=runtime(2880),
        gpu=1,
        cache_mb=setting("generate", "cache_mb"),
        checkpoint_every=setting("generate", "checkpoint_every"),
    params:
        generator=setting("generate", "generator"),
        seed=setting("generate", "seed"),
        checkpoint="results/{dataset}/generate/uvit_{mode}.ckpt",
        code=library("train_generator.py"),
    script:
        "../../scripts/train_generator.py"


rule finetune_decoder:
    """HistoDiffusion: the decoder fine-tuned with an auxiliary classifier, encoder frozen."""
    input:
        store="results/{dataset}/patches.zarr",
        autoencoder="results/{dataset}/generate/autoencoder.pt",
    output:
        "results/{dataset}/generate/decoder_ft.pt",
    log:
        "logs/finetune_decoder/{dataset}.log",
    benchmark:
        "benchmarks/finetune_decoder/{dataset}.tsv"
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=runtime(720),
        gpu=1,
        cache_mb=setting("generate", "cache_mb"),
        checkpoint_every=setting("generate", "checkpoint_every"),
    params:
        finetune=setting("generate", "finetune"),
        seed=setting("generate", "seed"),
        checkpoint="results/{dataset}/generate/decoder_ft.ckpt",
        code=library("finetune_decoder.py"),
    script:
        "../../scripts/finetune_decoder.py"


rule train_latent_classifier:
    """HistoDiffusion: the time-dependent classifier p(y | z_t, t) on noised latents."""
    input:
        store="results/{dataset}/patches.zarr",
        autoencoder="results/{dataset}/generate/autoencoder.pt",
    output:
        "results/{dataset}/generate/latent_classifier.pt",
    log:
        "logs/train_latent_classifier/{dataset}.log",
    benchmark:
        "benchmarks/train_latent_classifier/{dataset}.tsv"
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=runtime(1440),
        gpu=1,
        cache_mb=setting("generate", "cache_mb"),
        checkpoint_every=setting("generate", "checkpoint_every"),
    params:
        classifier=setting("generate", "latent_classifier"),
        schedule=lambda wc: hdparams.canonical(
            section(wc.dataset, "generate")["generator"]["schedule"]
        ),
        seed=setting("generate", "seed"),
        checkpoint="results/{dataset}/generate/latent_classifier.ckpt",
        code=library("train_latent_classifier.py"),
    script:
        "../../scripts/train_latent_classifier.py"


rule sample_synthetic:
    """M images per class from a generator into a patch store (resumable by batch)."""
    input:
        unpack(generator_files),
    output:
        directory("results/{dataset}/synthetic/{generator}.zarr"),
    log:
        "logs/sample_synthetic/{dataset}/{generator}.log",
    benchmark:
        "benchmarks/sample_synthetic/{dataset}/{generator}.tsv"
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=runtime(720),
        gpu=1,
    params:
        sampling=lambda wc: hdparams.canonical(
            section(wc.dataset, "generate")["sampling"][wc.generator]
        ),
        per_class=lambda wc: section(wc.dataset, "generate")["sampling"]["per_class"],
        batch=lambda wc: section(wc.dataset, "generate")["sampling"]["batch"],
        seed=setting("generate", "seed"),
        code=library("sample_synthetic.py"),
    script:
        "../../scripts/sample_synthetic.py"


rule generator_quality:
    """In-domain FID, precision and recall of a synthetic store; per-class sample grid."""
    input:
        synthetic="results/{dataset}/synthetic/{generator}.zarr",
        store="results/{dataset}/patches.zarr",
        encoder=lambda wc: "results/{dataset}/encoders/%s.pt"
        % section(wc.dataset, "generate")["quality"]["encoder"],
    output:
        json="results/{dataset}/generate/{generator}_quality.json",
        grid=report(
            "results/{dataset}/generate/{generator}_grid.png",
            caption="../report/generated.rst",
            category="Generators",
            labels={"dataset": "{dataset}", "generator": "{generator}"},
        ),
    log:
        "logs/generator_quality/{dataset}/{generator}.log",
    benchmark:
        "benchmarks/generator_quality/{dataset}/{generator}.tsv"
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=runtime(240),
        gpu=1,
    params:
        quality=lambda wc: hdparams.canonical(
            {
                **section(wc.dataset, "generate")["quality"],
                "seed": section(wc.dataset, "generate")["seed"],
            }
        ),
        code=library("generator_quality.py"),
    script:
        "../../scripts/generator_quality.py"
