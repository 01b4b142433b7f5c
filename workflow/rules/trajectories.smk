# Expert trajectories for trajectory matching (mtt, ptm): trained once per dataset and network.


def trajectory_settings(wildcards):
    """What buffer_experts reads: the dataset's trajectories section without operational knobs.
    The file is named after the network; asking for another one names the key to change."""
    settings = section(wildcards.dataset, "trajectories")
    if wildcards.arch != settings["net"]:
        raise WorkflowError(
            f"[buffer_experts] results/{wildcards.dataset}/experts/{wildcards.arch}.h5: "
            f"trajectories.net is {settings['net']!r}; set it to {wildcards.arch!r} "
            "to buffer these experts"
        )
    return hdparams.without_operational(settings)


rule buffer_experts:
    """Expert trajectories (MTT's buffer.py): networks trained on the real training split, their
    parameters after every epoch in one HDF5 store; resumable expert by expert."""
    input:
        "results/{dataset}/patches.zarr",
    output:
        "results/{dataset}/experts/{arch}.h5",
    log:
        "logs/buffer_experts/{dataset}/{arch}.log",
    benchmark:
        "benchmarks/buffer_experts/{dataset}/{arch}.tsv"
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=lambda wc, attempt: 1440 * attempt,
        gpu=1,
        cache_mb=setting("trajectories", "cache_mb"),
    params:
        trajectories=trajectory_settings,
        code=library("buffer_experts.py"),
    script:
        "../../scripts/buffer_experts.py"
