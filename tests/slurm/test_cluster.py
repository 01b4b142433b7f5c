"""`snakemake --profile <clone>/slurm`, run from outside the repository, through the real
single-node cluster of `make test-slurm` (tests/slurm/run.sh): every job goes through sbatch,
the partition file alone routes every GPU rule to the gpu partition (and every other rule to
cpu), and the GPU rules get the fake GPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
STATE = os.environ.get("HISTODISTILL_SLURM_STATE")
pytestmark = pytest.mark.skipif(not STATE, reason="needs the cluster of `make test-slurm`")

TARGET = "results/demo/dm_ipc2.json"


def declared_gpu_rules() -> set[str]:
    """Rules whose own resources declare gpu=1, read from the rule files (new stages count)."""
    rules = set()
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        blocks = re.findall(r"^(?:rule|checkpoint) (\w+):\n((?:[ \t]+.*\n|\n)*)", smk.read_text(), re.M)
        rules |= {name for name, body in blocks if re.search(r"^\s+gpu=1,", body, re.M)}
    return rules


GPU_RULES = declared_gpu_rules()


def executed_jobs(text: str) -> dict[str, int]:
    """Rule -> number of jobs snakemake started, local or not, from its per-job blocks (the
    'Job stats' table is printed before the cohort checkpoint adds the tile_slides jobs)."""
    blocks = re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):\n(?:    .*\n)*?    jobid: (\d+)$", text, re.M)
    jobs = dict((jobid, rule) for rule, jobid in blocks)
    return {rule: list(jobs.values()).count(rule) for rule in set(jobs.values())}


def jobcomp_states(path: Path) -> dict[str, str]:
    """Job id -> final state, from SLURM's job completion records (jobcomp/filetxt)."""
    records = (dict(re.findall(r"(\w+)=(\S*)", line)) for line in path.read_text().splitlines())
    return {r["JobId"]: r["JobState"] for r in records}


def task_environments(path: Path) -> dict[str, set[str]]:
    """Job id -> the CUDA_VISIBLE_DEVICES values its tasks started with (the TaskProlog's log)."""
    seen: dict[str, set[str]] = {}
    for line in path.read_text().splitlines():
        job, devices = line.split()
        seen.setdefault(job, set()).add(devices)
    return seen


def job_record(job: str) -> str:
    """The controller's record of a finished job (kept for MinJobAge)."""
    return subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True,
                          check=True).stdout


def gpus_requested(job: str) -> bool:
    """Whether a job's record holds a GPU."""
    return re.search(r"gres[:/]gpu[:=]1\b", job_record(job)) is not None


def partition(job: str) -> str:
    """The partition a job ran in."""
    return re.search(r"\bPartition=(\S+)", job_record(job)).group(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The tiny demo target built with `--profile slurm`; added only: test-speed polling, no
    retries, and squeue for job status (this cluster has no accounting database for sacct)."""
    work = tmp_path_factory.mktemp("slurm")
    # from the project folder, not the clone: the profile finds the Snakefile and partitions
    cmd = [sys.executable, "-m", "snakemake", TARGET,
           "--configfile", str(ROOT / "config.yaml"), str(ROOT / "configs/demo.yaml"),
           str(ROOT / "tests/slurm/tiny.yaml"),
           "--profile", str(ROOT / "slurm"), "--retries", "0", "--latency-wait", "5",
           "--slurm-init-seconds-before-status-checks", "2", "--slurm-status-command", "squeue"]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=900)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        jobs = "".join(f"\n== {p}\n{p.read_text()[-2000:]}"
                       for p in (work / ".snakemake/slurm_logs").rglob("*.log"))
        pytest.fail(f"snakemake --profile slurm failed:\n{text[-3000:]}{jobs}")
    return work, text


@pytest.fixture(scope="module")
def slurm_jobs(run: tuple[Path, str]) -> dict[str, str]:
    """SLURM job id -> rule, from the plugin's per-job logs (rule_<rule>/.../<jobid>.log)."""
    logs = run[0] / ".snakemake/slurm_logs"
    return {p.stem: p.relative_to(logs).parts[0].removeprefix("rule_") for p in logs.rglob("*.log")}


def test_every_job_went_through_sbatch(run, slurm_jobs):
    work, text = run
    assert (work / TARGET).exists()
    ran = {rule: list(slurm_jobs.values()).count(rule) for rule in set(slurm_jobs.values())}
    assert ran == executed_jobs(text)
    assert sorted(re.findall(r"submitted with SLURM jobid (\d+)", text)) == sorted(slurm_jobs)
    states = jobcomp_states(Path(STATE) / "jobcomp.txt")
    assert {states[job] for job in slurm_jobs} == {"COMPLETED"}


def test_gpu_rules_were_given_the_gpu(slurm_jobs):
    env = task_environments(Path(STATE) / "task_env.txt")
    assert "distill" in slurm_jobs.values()
    for job, rule in slurm_jobs.items():
        gpu = rule in GPU_RULES
        why = f"{rule} (SLURM job {job}): GPU rules must declare gpu=1 and get the one GPU"
        assert env[job] == ({"0"} if gpu else {"none"}), f"{why}; CUDA_VISIBLE_DEVICES {env[job]}"
        assert gpus_requested(job) == gpu, why


def test_the_partition_file_routes_every_gpu_rule_to_the_gpu_partition(slurm_jobs):
    """One setting (slurm/partitions.yaml, no slurm_partition anywhere): GPU rules to gpu,
    the rest to cpu."""
    routed = {job: partition(job) for job in slurm_jobs}
    for job, rule in slurm_jobs.items():
        assert routed[job] == ("gpu" if rule in GPU_RULES else "cpu"), (rule, job, routed[job])
    assert {"gpu", "cpu"} == set(routed.values())
