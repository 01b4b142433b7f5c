rule report_result:
    """Training curves and result table of one result file, for `snakemake --report`."""
    input:
        "results/{dataset}/{method}_ipc{ipc}.json",
    output:
        curves=report(
            "results/{dataset}/report/{method}_ipc{ipc}_curves.png",
            caption="../report/curves.rst",
            category="Evaluation",
            subcategory="Training curves",
            labels={"dataset": "{dataset}", "method": "{method}", "ipc": "{ipc}"},
        ),
        table=report(
            "results/{dataset}/report/{method}_ipc{ipc}_table.html",
            caption="../report/table.rst",
            category="Evaluation",
            subcategory="Result tables",
            labels={"dataset": "{dataset}", "method": "{method}", "ipc": "{ipc}"},
        ),
    log:
        "logs/report_result/{dataset}/{method}_ipc{ipc}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../../scripts/report_result.py"
