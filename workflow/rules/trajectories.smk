# Expert trajectories for trajectory matching (mtt, ptm): trained once per dataset and network.
# Input and settings functions live in trajectory_inputs.smk.


rule buffer_experts:
    """Expert trajectories (MTT's buffer.py): networks trained on the real training split, their
    parameters after every epoch in one HDF5 store; resumable expert by expert."""
    input:
        "results/{dataset}/patches.zarr",
    output:
        "results/{dataset}/experts/{arch}{owner}.h5",
    log:
        "logs/buffer_experts/{dataset}/{arch}{owner}.log",
    benchmark:
        "benchmarks/buffer_experts/{dataset}/{arch}{owner}.tsv"
    wildcard_constraints:
        arch=r"[a-z0-9]+",
        owner=r"(_[a-z]+)?",
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=runtime(1440),
        gpu=1,
        cache_mb=setting("trajectories", "cache_mb"),
    params:
        trajectories=trajectory_settings,
        code=library("buffer_experts.py"),
    script:
        "../../scripts/buffer_experts.py"
