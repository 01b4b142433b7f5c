# Input functions of the distillation rules (distill.smk): a method's extra inputs, from its
# catalogue row (histodistill/catalogue.py).


def extra_inputs(name, method):
    """What ``method`` needs beyond the store and the template (its catalogue row's inputs):
    Histo-DD its network pool, trajectory matching its expert trajectories, the latent
    methods (GLaD, SLFD) the generator's autoencoder."""
    paths = {
        "pool": lambda: f"results/{name}/pool.pt",
        "experts": lambda: expert_buffer(name, method),
        "autoencoder": lambda: f"results/{name}/generate/autoencoder.pt",
    }
    return {need: paths[need]() for need in hdcatalogue.get(method).inputs}


def method_inputs(wildcards):
    """The distill rule's extra inputs, once ipc is checked against the class counts."""
    check_ipc(wildcards)
    return extra_inputs(wildcards.dataset, wildcards.method)
