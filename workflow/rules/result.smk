rule result:
    """The result file of one distilled set: its patch-level evaluation, joined by the sections
    of the later stages that apply to the dataset (each its own job, so editing one stage's
    settings reruns that stage and this join, nothing else)."""
    input:
        unpack(result_parts),
    output:
        "results/{dataset}/{method}_ipc{ipc}.json",
    log:
        "logs/result/{dataset}/{method}_ipc{ipc}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=library("result.py"),
    script:
        "../../scripts/result.py"
