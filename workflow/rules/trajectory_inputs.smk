# Settings and inputs of the trajectory-matching stages: the buffer_experts rule
# (trajectories.smk), and every method's extra inputs of the distill rule in distill.smk (the
# pool, the expert trajectories, the autoencoder).


def trajectory_settings(wildcards):
    """What buffer_experts reads: the dataset's trajectories section without operational knobs.
    The file is named after the network; asking for another one names the key to change.
    """
    settings = section(wildcards.dataset, "trajectories")
    if wildcards.arch != settings["net"]:
        raise WorkflowError(
            f"[buffer_experts] results/{wildcards.dataset}/experts/{wildcards.arch}.h5: "
            f"trajectories.net is {settings['net']!r}; set it to {wildcards.arch!r} "
            "to buffer these experts"
        )
    return hdparams.without_operational(settings)


def method_inputs(wildcards):
    """What a method needs beyond the store and the template: Histo-DD its network pool,
    trajectory matching the expert trajectories of the configured network, the latent methods
    (GLaD, SLFD) the generator's autoencoder."""
    name = wildcards.dataset
    if wildcards.method == "histodd":
        return {"pool": f"results/{name}/pool.pt"}
    if wildcards.method in ("mtt", "ptm"):
        net = section(name, "trajectories")["net"]
        return {"experts": f"results/{name}/experts/{net}.h5"}
    if wildcards.method in ("glad", "slfd"):
        return {"autoencoder": f"results/{name}/generate/autoencoder.pt"}
    return {}
