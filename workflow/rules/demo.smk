rule demo_cohort:
    """Render the synthetic Camelyon16-shaped demo cohort (slides, XML annotations, labels)."""
    output:
        directory("results/demo/cohort"),
    params:
        spec=config["demo"],
    log:
        "logs/demo_cohort.log",
    benchmark:
        "benchmarks/demo_cohort.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    script:
        "../../scripts/demo_cohort.py"


rule demo_patches:
    """Render the synthetic pre-tiled patch set (six tissue classes, MedMNIST npz layout)."""
    output:
        "results/demo_patches/demo_patches.npz",
    params:
        spec=config["demo_patches"],
    log:
        "logs/demo_patches.log",
    benchmark:
        "benchmarks/demo_patches.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    script:
        "../../scripts/demo_patches.py"
