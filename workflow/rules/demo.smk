rule demo_cohort:
    """Render the synthetic Camelyon16-shaped demo cohort (slides, XML annotations, labels)."""
    output:
        directory("results/demo/cohort"),
    log:
        "logs/demo_cohort.log",
    benchmark:
        "benchmarks/demo_cohort.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=runtime(30),
    params:
        spec=hdparams.canonical(config["demo"]),
        code=library("demo_cohort.py"),
    script:
        "../../scripts/demo_cohort.py"


rule demo_patches:
    """Render the synthetic pre-tiled patch set (six tissue classes, MedMNIST npz layout)."""
    output:
        "results/demo_patches/demo_patches.npz",
    log:
        "logs/demo_patches.log",
    benchmark:
        "benchmarks/demo_patches.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=runtime(30),
    params:
        spec=hdparams.canonical(config["demo_patches"]),
        code=library("demo_patches.py"),
    script:
        "../../scripts/demo_patches.py"
