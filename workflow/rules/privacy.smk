rule privacy_audit:
    """Nearest-real-neighbour distances and a membership-inference attack on one distilled or
    selected set, against the real training and held-out patches; the closest pairs as a grid.
    """
    input:
        distilled="results/{dataset}/distilled/{method}_ipc{ipc}.zarr",
        store="results/{dataset}/patches.zarr",
        encoder=privacy_encoder,
    output:
        json="results/{dataset}/privacy/{method}_ipc{ipc}.json",
        grid=report(
            "results/{dataset}/privacy/{method}_ipc{ipc}_pairs.png",
            caption="../report/privacy_pairs.rst",
            category="Privacy",
            subcategory="Closest pairs",
            labels={"dataset": "{dataset}", "method": "{method}", "ipc": "{ipc}"},
        ),
    log:
        "logs/privacy_audit/{dataset}/{method}_ipc{ipc}.log",
    benchmark:
        "benchmarks/privacy_audit/{dataset}/{method}_ipc{ipc}.tsv"
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=runtime(240),
        gpu=1,
        batch=setting("privacy", "batch"),
    params:
        privacy=lambda wc: hdparams.privacy_audit_settings(
            section(wc.dataset, "privacy")
        ),
        code=library("privacy_audit.py"),
    script:
        "../../scripts/privacy_audit.py"


rule package:
    """The shareable package of a distilled set (images, labels, datasheet, checksums; nothing
    from the real patches), after the guard against coresets and memorised images."""
    input:
        distilled="results/{dataset}/distilled/{method}_ipc{ipc}.zarr",
        result="results/{dataset}/{method}_ipc{ipc}.json",
        store="results/{dataset}/patches.zarr",
    output:
        share=directory("results/{dataset}/{method}_ipc{ipc}.share"),
        datasheet=report(
            "results/{dataset}/report/{method}_ipc{ipc}_datasheet.html",
            caption="../report/datasheet.rst",
            category="Shareable packages",
            labels={"dataset": "{dataset}", "method": "{method}", "ipc": "{ipc}"},
        ),
    log:
        "logs/package/{dataset}/{method}_ipc{ipc}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=runtime(30),
    params:
        package=lambda wc: hdparams.canonical(section(wc.dataset, "privacy")["package"]),
        code=library("package.py"),
    script:
        "../../scripts/package.py"
