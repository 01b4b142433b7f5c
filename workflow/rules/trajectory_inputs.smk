# Settings and inputs of the trajectory-matching stages: the buffer_experts rule
# (trajectories.smk) and the expert store a trajectory method's distill job reads.


def trajectory_settings(wildcards):
    """What buffer_experts reads: the dataset's trajectories section without operational knobs,
    with a method's own overrides for its own buffer (``<net>_<method>.h5``:
    distill.methods.<method>.trajectories). The file is named after the network; asking for
    another one names the key to change."""
    settings = section(wildcards.dataset, "trajectories")
    owner = wildcards.owner.lstrip("_")
    if owner:
        own = section(wildcards.dataset, "distill")["methods"].get(owner, {})
        if "trajectories" not in own:
            raise WorkflowError(
                f"[buffer_experts] results/{wildcards.dataset}/experts/{wildcards.arch}"
                f"{wildcards.owner}.h5: distill.methods.{owner}.trajectories is not set"
            )
        settings = hdconfig.merge(settings, own["trajectories"])
    if wildcards.arch != settings["net"]:
        raise WorkflowError(
            f"[buffer_experts] results/{wildcards.dataset}/experts/{wildcards.arch}.h5: "
            f"trajectories.net is {settings['net']!r}; set it to {wildcards.arch!r} "
            "to buffer these experts"
        )
    return hdparams.without_operational(settings)


def expert_buffer(name, method):
    """The expert store a trajectory method reads: its own (distill.methods.<method>.
    trajectories set) or the dataset's shared one."""
    own = section(name, "distill")["methods"].get(method, {})
    settings = section(name, "trajectories")
    if "trajectories" in own:  # its epochs reach end_epoch (checked on load)
        merged = hdconfig.merge(settings, own["trajectories"])
        return f"results/{name}/experts/{merged['net']}_{method}.h5"
    return f"results/{name}/experts/{settings['net']}.h5"
