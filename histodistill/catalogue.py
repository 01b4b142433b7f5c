"""The method catalogue: one row per method a result target can name, in table order.

A row says where the method is implemented (the module that registers it), which stage makes
its set (``distill``: a distiller or coreset of :mod:`histodistill.distill`; ``select``: a
selection from a pool, :mod:`histodistill.select`), what the distill rule must give it beyond
the patch store and the stain template, whether it can distil one slide at a time (and why
not), and whether its images are real patients' patches. Everything else derives from it: the
rule files' wildcard constraints and the distill rule's inputs, the schema's method enum, the
per-slide refusals, the tables' row order and the share package's coreset guard.

Adding a method: its module (registering the implementation under its name) and one row here.
Plain Python, no torch: the workflow reads it while it builds the DAG.
"""

from __future__ import annotations

from dataclasses import dataclass

STAGES = ("distill", "select")
# Extra inputs of the distill rule: Histo-DD's network pool, the expert trajectories of
# trajectory matching, the generator's autoencoder that latent methods optimise through
INPUTS = ("pool", "experts", "autoencoder")

TRAJECTORIES = ("it matches expert trajectories trained on the whole training split, which one "
                "slide's patches (often one class, a class short of ipc) cannot follow; per-slide "
                "experts are not buffered")
LATENT = ("latent distillation through the generator's autoencoder is not wired into "
          "distill_slides (one autoencoder per dataset, not per slide)")
GENERATED = "it selects from a pool of generated images per class, not from one slide's patches"


@dataclass(frozen=True)
class Method:
    """One method: see the module docstring."""

    name: str
    stage: str
    module: str  # the module whose import registers the implementation
    family: str  # what kind of method, as the docs group them
    reference: str  # the paper (and reference code) it follows
    inputs: tuple[str, ...] = ()
    not_per_slide: str = ""  # why it cannot run per slide; empty: it can
    real_patches: bool = False  # its images are real patches (a coreset), not synthetic

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"catalogue row {self.name}: stage {self.stage!r} not in {STAGES}")
        unknown = set(self.inputs) - set(INPUTS)
        if unknown:
            raise ValueError(f"catalogue row {self.name}: inputs {sorted(unknown)} not in {INPUTS}")


CATALOGUE: tuple[Method, ...] = (
    Method("histodd", "distill", "histodistill.distill.histodd", "gradient matching",
           "Histo-DD (pool-based gradient matching, stain-normalised)", inputs=("pool",)),
    Method("ptm", "distill", "histodistill.distill.ptm", "trajectory matching",
           "progressive trajectory matching", inputs=("experts",),
           not_per_slide="it matches expert trajectories trained on the whole training split (as "
           "mtt) and splits each class's images into halves, which a class with fewer than two "
           "patches cannot"),
    Method("mtt", "distill", "histodistill.distill.mtt", "trajectory matching",
           "MTT (Cazenavette et al. 2022, GeorgeCazenavette/mtt-distillation)",
           inputs=("experts",), not_per_slide=TRAJECTORIES),
    Method("dsa", "distill", "histodistill.distill.dc", "gradient matching",
           "DSA (Zhao & Bilen 2021, VICO-UoE/DatasetCondensation)"),
    Method("dc", "distill", "histodistill.distill.dc", "gradient matching",
           "DC (Zhao et al. 2021, VICO-UoE/DatasetCondensation)"),
    Method("dm", "distill", "histodistill.distill.dm", "distribution matching",
           "DM (Zhao & Bilen 2023, VICO-UoE/DatasetCondensation)"),
    Method("herding", "distill", "histodistill.distill.coreset", "coreset",
           "herding (Welling 2009) in a trained network's features", real_patches=True,
           not_per_slide="its feature network would be trained on one slide's patches, mostly of "
           "one class, so the features it herds in carry no class information"),
    Method("forgetting", "distill", "histodistill.distill.coreset", "coreset",
           "forgetting events (Toneva et al. 2019)", real_patches=True,
           not_per_slide="forgetting events need a network trained on several classes; on one "
           "slide's patches (mostly one class) nothing is ever forgotten and the ranking is random"),
    Method("random", "distill", "histodistill.distill.coreset", "coreset",
           "random real patches per class", real_patches=True),
    Method("slfd", "distill", "histodistill.distill.slfd", "latent distillation",
           "SLFD (stochastic latent feature distillation)", inputs=("autoencoder",),
           not_per_slide=LATENT),
    Method("glad", "distill", "histodistill.distill.glad", "latent distillation",
           "GLaD (Cazenavette et al. 2023, GeorgeCazenavette/glad)", inputs=("autoencoder",),
           not_per_slide=LATENT),
    Method("infodist", "select", "histodistill.select.infodist", "selection",
           "InfoDist (Li & Kainz 2024, ZheLi2020/InfoDist) on generated images",
           not_per_slide=GENERATED),
    Method("infodist_real", "select", "histodistill.select.infodist", "selection",
           "InfoDist's selection applied to the real patches", real_patches=True,
           not_per_slide="its communities are found among a class's patches across the cohort; "
           "one slide's few patches per class give no community structure"),
    Method("centroid", "select", "histodistill.select.centroid", "selection",
           "HistoDiffusion's confident-and-central samples", not_per_slide=GENERATED),
    Method("synrandom", "select", "histodistill.select.base", "selection",
           "random generated images per class", not_per_slide=GENERATED),
)
BY_NAME: dict[str, Method] = {m.name: m for m in CATALOGUE}


def names(stage: str | None = None) -> list[str]:
    """Method names in table order, of one stage or of all."""
    return [m.name for m in CATALOGUE if stage is None or m.stage == stage]


def get(name: str) -> Method:
    """The row of ``name``; a KeyError naming the catalogued methods otherwise."""
    if name not in BY_NAME:
        raise KeyError(f"unknown method {name!r}; the catalogue (histodistill/catalogue.py) "
                       f"has {names()}")
    return BY_NAME[name]


def modules(stage: str) -> list[str]:
    """The modules that register a stage's methods, each once, in catalogue order."""
    return list(dict.fromkeys(m.module for m in CATALOGUE if m.stage == stage))
