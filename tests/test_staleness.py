"""What reruns what: Snakemake's own dry run over a recorded demo state, each case both ways.

The state is a copy of the workflow and the library in a temporary folder (so a test can edit a
library module), with every output of the tiny demo target created empty and recorded by
``snakemake --touch`` (which stores the params, code and inputs of each job as a real run does).
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from histodistill import params
from test_workflow import planned_jobs, tiny_config

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
TRIGGERS = ("--rerun-triggers", "mtime", "params", "input", "code")
BELOW_TEMPLATE = {"stain_template": 1, "pretrain_pool": 1, "distill": 3, "full_train": 1,
                  "evaluate": 3, "privacy_audit": 3, "result": 3, "demo": 1, "distill_slides": 3,
                  "extract_features": 3, "evaluate_mil": 3}


def run(work: Path, *args: str) -> subprocess.CompletedProcess:
    """snakemake in ``work`` on its own copy of the workflow and library."""
    proc = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=work,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(work)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def planned(work: Path, *args: str, goals: tuple[str, ...] = ("demo",)) -> dict[str, int]:
    """Jobs a dry run of ``goals`` (default: the demo target) plans: rule -> count."""
    return planned_jobs(run(work, "-n", *goals, *args, *TRIGGERS))


def recorded_state(work: Path, *goals: str, **edits: dict) -> Path:
    """A copy of the workflow and library in ``work`` with the tiny config (``tiny_config`` with
    ``edits``), every output of the target rules or files ``goals`` (default: ``demo``) created
    empty and recorded as built and up to date with ``snakemake --touch``."""
    goals = goals or ("demo",)
    for name in ("Snakefile", "workflow", "scripts", "histodistill", "envs"):
        copy_ = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy_(ROOT / name, work / name)
    (work / "profiles").symlink_to("workflow/profiles")
    tiny_config(work / "config.yaml", **edits)
    slide_table(work)
    for line in run(work, "--summary", *goals).stdout.splitlines()[1:]:
        out = work / line.split("\t")[0]
        if out.suffix in ("", ".zarr"):  # directory outputs
            out.mkdir(parents=True, exist_ok=True)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.touch()
    run(work, "--touch", "--forceall", "--cores", "1", *goals)
    assert planned(work, goals=goals) == {}
    return work


def slide_table(work: Path) -> None:
    """The tiny demo's slide table (the cohort checkpoint's output) and empty slide files, so
    the jobs planned from the table (tiling, per-slide distillation) are part of the state."""
    cohort = work / "results/demo/cohort"
    rows = ["slide,path,label,split,centre,annotation"]
    for name, label, split in (("normal_001", "normal", "train"), ("tumor_001", "tumor", "train"),
                               ("test_001", "normal", "test"), ("test_002", "tumor", "test")):
        folder = f"training/{label}" if split == "train" else "testing/images"
        slide = cohort / folder / f"{name}.tif"
        slide.parent.mkdir(parents=True, exist_ok=True)
        slide.touch()
        rows.append(f"{name},{slide.relative_to(work)},{label},{split},{-1 if split == 'test' else 0},")
    (work / "results/demo/slides.csv").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return recorded_state(tmp_path_factory.mktemp("staleness"))


@contextmanager
def edited_config(work: Path, edit) -> Iterator[None]:  # noqa: ANN001
    """The state's config.yaml changed by ``edit(cfg)`` for the duration of the block."""
    path = work / "config.yaml"
    original = path.read_text()
    cfg = yaml.safe_load(original)
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    try:
        yield
    finally:
        path.write_text(original)


@contextmanager
def edited_module(work: Path, module: str) -> Iterator[None]:
    """A comment appended to one library module of the state for the duration of the block."""
    path = work / "histodistill" / module
    original = path.read_text()
    path.write_text(original + "\n# edited\n")
    try:
        yield
    finally:
        path.write_text(original)


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
        proc = run(state, "-n", "demo", *TRIGGERS)
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
    forced = run(state, "-n", "--forceall", "demo", "--config", *knobs).stdout
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
    script = tmp_path / "s.py"
    script.write_text("import os\nfrom histodistill.logs import rule_logging\n")
    other = tmp_path / "t.py"
    other.write_text("from histodistill import logs  # same module, other spelling\n")
    assert params.library_hash(script) == params.library_hash(other) != params.library_hash(stain)


def test_canonical_settings_ignore_order_and_what_the_rule_does_not_read():
    a = {"b": 1, "a": {"y": [{"q": 1, "p": 2}], "x": 2}}
    b = copy.deepcopy({"a": {"x": 2, "y": [{"p": 2, "q": 1}]}, "b": 1})
    assert repr(params.canonical(a)) == repr(params.canonical(b)) != repr(a)
    evaluate = {"archs": ["convnet", "vit"], "arch_kwargs": {"convnet": {"width": 8}, "lenet": {}},
                "runs": 5, "seed": 0, "train": {"epochs": 3}, "full": {"epochs": 1},
                "augment": {}, "stain_norm": True, "boundary": {}, "cache_mb": 64}
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
        proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "demo"], cwd=state,
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(state)})
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
