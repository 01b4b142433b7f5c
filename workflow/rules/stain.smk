rule stain_template:
    """Histo-DD's Macenko template: the patch closest to the dataset's mean and std."""
    input:
        "results/{dataset}/patches.zarr",
    output:
        json="results/{dataset}/stain/template.json",
        png=report(
            "results/{dataset}/stain/template.png",
            caption="../report/stain_template.rst",
            category="Stain template",
            labels={"dataset": "{dataset}"},
        ),
    log:
        "logs/stain_template/{dataset}.log",
    benchmark:
        "benchmarks/stain_template/{dataset}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=runtime(60),
    params:
        stain=hdparams.canonical(config["stain"]),
        code=library("stain_template.py"),
    script:
        "../../scripts/stain_template.py"
