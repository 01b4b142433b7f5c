"""What reruns what: Snakemake's own dry run over a recorded demo state, each case both ways.

The state is a copy of the workflow and the library in a temporary folder (so a test can edit a
library module), with every output of the tiny demo target created empty and recorded by
``snakemake --touch`` (which stores the params, code and inputs of each job as a real run does).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import edited_config, edited_module, planned, planned_jobs, recorded_state, snakemake
from histodistill import config, params

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
TRIGGERS = ("--rerun-triggers", "mtime", "params", "input", "code")
BELOW_TEMPLATE = {"stain_template": 1, "pretrain_pool": 1, "distill": 3, "full_train": 1,
                  "evaluate": 3, "privacy_audit": 3, "result": 3, "demo": 1, "distill_slides": 3,
                  "extract_features": 3, "evaluate_mil": 3}


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return recorded_state(tmp_path_factory.mktemp("staleness"))


def reversed_keys(section: dict) -> dict:
    return {k: section[k] for k in reversed(list(section))}


def test_evaluate_runs_reruns_evaluate_but_not_the_cached_full_train(state):
    with edited_config(state, lambda c: c["datasets"]["demo"]["evaluate"].update(runs=3)):
        assert planned(state) == {"evaluate": 3, "result": 3, "demo": 1}
    # the full-data training reads its own settings: changing them reruns it
    with edited_config(state, lambda c: c["datasets"]["demo"]["evaluate"]["full"].update(epochs=2)):
        assert planned(state) == {"full_train": 1, "evaluate": 3, "result": 3, "demo": 1}


def test_adding_an_architecture_trains_only_the_new_one(state):
    archs = ["convnet", "lenet"]
    with edited_config(state, lambda c: c["datasets"]["demo"]["evaluate"].update(archs=archs)):
        proc = snakemake(state, "-n", "demo", *TRIGGERS)
        assert planned_jobs(proc) == {"full_train": 1, "evaluate": 3, "result": 3, "demo": 1}
        assert "results/demo/full/lenet.json" in proc.stdout
        assert "output: results/demo/full/convnet.json" not in proc.stdout
    # but a changed arch_kwargs of an evaluated architecture retrains it
    kwargs = {"convnet": {"width": 16, "norm": "batchnorm"}}
    with edited_config(state, lambda c: c["datasets"]["demo"]["evaluate"].update(arch_kwargs=kwargs)):
        assert planned(state) == {"full_train": 1, "evaluate": 3, "result": 3, "demo": 1}


def test_operational_knobs_rerun_nothing(state):
    knobs = ("distill={checkpoint_every: 3, cache_mb: 64}", "evaluate={cache_mb: 32}",
             "mil={batch: 64, cache_mb: 32}")
    assert planned(state, "--config", *knobs) == {}
    forced = snakemake(state, "-n", "--forceall", "demo", "--config", *knobs).stdout
    assert "cache_mb=64, checkpoint_every=3" in forced and "cache_mb=32" in forced  # they apply
    # while a setting that changes what distillation computes does rerun it
    assert planned(state, "--config", "distill={max_real_per_class: 50}") == {
        "pretrain_pool": 1, "distill": 3, "evaluate": 3, "privacy_audit": 3, "result": 3, "demo": 1,
        "distill_slides": 1, "extract_features": 1, "evaluate_mil": 1}  # histodd's pool


def test_slide_settings_rerun_only_the_slide_stage(state):
    mil = lambda c: c["datasets"]["demo"]["mil"]  # noqa: E731
    with edited_config(state, lambda c: mil(c)["settings"]["clam_sb"].update(epochs=3)):
        assert planned(state) == {"full_mil": 1, "evaluate_mil": 3, "result": 3, "demo": 1}
    with edited_config(state, lambda c: mil(c).update(runs=2)):  # every cached full bag too
        assert planned(state) == {"full_mil": 2, "evaluate_mil": 3, "result": 3, "demo": 1}
    with edited_config(state, lambda c: mil(c)["distill"]["histodd"].update(outer_loop=2)):
        assert planned(state) == {"distill_slides": 1, "extract_features": 1, "evaluate_mil": 1,
                                  "result": 1, "demo": 1}
    with edited_config(state, lambda c: mil(c).update(models=["dsmil"])):  # cached bounds kept
        assert planned(state) == {"evaluate_mil": 3, "result": 3, "demo": 1}
    with edited_config(state, lambda c: mil(c)["transfer"].update(runs=2)):  # not in the demo
        assert planned(state) == {}


def test_reordering_keys_reruns_nothing(state):
    def reorder(cfg: dict) -> None:
        for name in ("stain", "distill", "evaluate", "demo"):
            cfg[name] = reversed_keys(cfg[name])
        demo = cfg["datasets"]["demo"]
        demo["distill"]["methods"] = {m: reversed_keys(s)
                                      for m, s in reversed_keys(demo["distill"]["methods"]).items()}
        demo["evaluate"] = reversed_keys(demo["evaluate"])
    with edited_config(state, reorder):
        assert planned(state) == {}
    # the same section with a changed value reruns its stage and below
    with edited_config(state, lambda c: c.update(stain=reversed_keys({**c["stain"], "beta": 0.2}))):
        assert planned(state) == BELOW_TEMPLATE


def test_library_edit_reruns_the_rules_that_run_it(state):
    with edited_module(state, "stain.py"):  # the template, and the stages that import it
        assert planned(state) == {**BELOW_TEMPLATE, "pretrain_pool": 1,  # pool training augments
                                  "train_encoder": 1, "extract_features": 4,  # with it, as do the
                                  "full_mil": 2}  # encoders; MIL trains with training.py, which imports it
    with edited_module(state, "evaluate.py"):  # the evaluator: evaluations only, not distillation
        assert planned(state) == {"full_train": 1, "evaluate": 3, "result": 3, "demo": 1}
    with edited_module(state, "params.py"):  # imported by the Snakefile only, not by a rule
        assert planned(state) == {}
    assert planned(state) == {}  # the edit undone: back to up to date


def test_library_hash_follows_imports_and_nothing_else(tmp_path):
    stain = ROOT / "scripts" / "stain_template.py"
    files = {p.relative_to(params.PACKAGE).as_posix() for p in params.library_files(str(stain))}
    assert {"stain.py", "data/store.py", "logs.py", "__init__.py"} <= files
    assert not {"tiling.py", "evaluate.py", "params.py", "distill/base.py"} & files
    distill = {p.relative_to(params.PACKAGE).as_posix()
               for p in params.library_files(str(ROOT / "scripts" / "distill.py"))}
    assert {"distill/histodd.py", "distill/coreset.py", "data/stream.py", "models.py"} <= distill
    # the two demos share their rendering primitives, not each other's code
    cohort = {p.relative_to(params.PACKAGE).as_posix()
              for p in params.library_files(str(ROOT / "scripts" / "demo_cohort.py"))}
    patches = {p.relative_to(params.PACKAGE).as_posix()
               for p in params.library_files(str(ROOT / "scripts" / "demo_patches.py"))}
    ingest = {p.relative_to(params.PACKAGE).as_posix()
              for p in params.library_files(str(ROOT / "scripts" / "ingest.py"))}
    assert "data/ingest.py" in ingest and not any(f.startswith("slides/") for f in ingest)
    assert "synth/tissue.py" in cohort & patches
    assert "synth/patches.py" not in cohort and "synth/cohort.py" not in patches
    script = tmp_path / "s.py"
    script.write_text("import os\nfrom histodistill.logs import rule_logging\n")
    other = tmp_path / "t.py"
    other.write_text("from histodistill import logs  # same module, other spelling\n")
    assert params.library_hash(script) == params.library_hash(other) != params.library_hash(stain)


def test_canonical_settings_ignore_order_and_what_the_rule_does_not_read():
    a = {"b": 1, "a": {"y": [{"q": 1, "p": 2}], "x": 2}}
    b = copy.deepcopy({"a": {"x": 2, "y": [{"p": 2, "q": 1}]}, "b": 1})
    assert repr(params.canonical(a)) == repr(params.canonical(b)) != repr(a)
    evaluate = {**config.defaults("evaluate"), "archs": ["convnet", "vit"],
                "arch_kwargs": {"convnet": {"width": 8}, "lenet": {}}, "runs": 5, "seed": 0,
                "train": {"epochs": 3}, "full": {"epochs": 1}, "augment": {}, "stain_norm": True,
                "boundary": {}, "cache_mb": 64}
    full = params.full_train_settings(evaluate, "vit")
    assert full == {"arch_kwargs": {"vit": {}}, "augment": {}, "full": {"epochs": 1}, "seed": 0,
                    "stain_norm": True}
    ev = params.evaluate_settings(evaluate)
    assert "full" not in ev and "cache_mb" not in ev and ev["arch_kwargs"] == {"convnet": {"width": 8}}
    assert params.without_operational({"checkpoint_every": 5, "lr_img": 0.1}) == {"lr_img": 0.1}


def test_a_declared_grid_is_distilled_per_candidate_and_chosen_before_the_set(state):
    """tuning.candidates.dm: each candidate distilled and evaluated on val, one choice, then the
    dm set (which takes the chosen candidate's) and dm's per-slide sets (which run with the
    chosen settings) with what reads them; nothing else reruns."""
    def grid(cfg: dict) -> None:
        cfg.setdefault("tuning", {})["candidates"] = {"dm": [{"lr_img": 0.5}, {"lr_img": 2.0}]}

    with edited_config(state, grid):
        jobs = planned(state)
    assert jobs == {"tune_candidate": 2, "tune": 1, "distill": 1, "evaluate": 1,
                    "privacy_audit": 1, "result": 1, "demo": 1, "distill_slides": 1,
                    "extract_features": 1, "evaluate_mil": 1}

    def typo(cfg: dict) -> None:
        cfg.setdefault("tuning", {})["candidates"] = {"dm": [{"lr_image": 0.5}]}

    with edited_config(state, typo):
        proc = snakemake(state, "-n", "demo", check=False)
    assert proc.returncode != 0 and "'lr_image'" in proc.stdout + proc.stderr


def test_further_distillation_seeds_add_only_their_own_sets(state):
    """distill.seeds 3: the seed summary of dm needs two more dm sets and their evaluations; the
    distill.seed set is reused."""
    def seeds(cfg: dict) -> None:
        cfg["distill"]["seeds"] = 3

    with edited_config(state, seeds):
        jobs = planned(state, goals=("results/demo/seeds/dm_ipc10.json",))
    assert jobs == {"distill": 2, "evaluate": 2, "seeds": 1}


LOADED_BY_SCRIPTS = r"""
import ast, json, os, sys
import numpy, torch, zarr  # loaded once here, then every script's imports run in a fork
out = {}
for script in sys.argv[1:]:
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(read)
        tree = ast.parse(open(script).read())
        imports = ast.Module([n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], [])
        exec(compile(imports, script, "exec"), {})
        files = sorted(m.__file__ for name, m in sys.modules.items()
                       if name.split(".")[0] == "histodistill" and getattr(m, "__file__", None))
        os.write(write, json.dumps(files).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        out[script] = json.loads(pipe.read())
    os.wait()
print(json.dumps(out))
"""


def test_code_hash_covers_every_module_a_script_loads():
    """Each rule script's imports, run for real in a fresh process: every library module they
    load is in the files its code hash covers (lazy or dynamic imports would escape it)."""
    scripts = sorted(str(p) for p in (ROOT / "scripts").glob("*.py"))
    proc = subprocess.run([sys.executable, "-c", LOADED_BY_SCRIPTS, *scripts], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=True)
    loaded = __import__("json").loads(proc.stdout)
    assert sorted(loaded) == scripts
    for script, files in loaded.items():
        covered = {str(p) for p in params.library_files(script)}
        missing = {str(Path(f).resolve()) for f in files} - covered
        assert not missing, f"{script} loads modules its code hash does not cover: {missing}"
        assert files, script


def test_no_lazy_module_attributes_in_the_library():
    """A module-level ``__getattr__`` resolves names at run time, where the hash walker cannot
    follow them (the data package did so until the walker missed a module through it)."""
    import ast

    lazy = [str(p) for p in params.PACKAGE.rglob("*.py")
            if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__"
                   for n in ast.parse(p.read_text()).body)]
    assert lazy == []
