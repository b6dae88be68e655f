"""The demo DAG through the SLURM profile on a real (one-node, localhost) SLURM cluster.

The session fixture runs ``tests/slurm/start_cluster.sh`` (as root: installs Debian's ``slurm-wlm`` and
``munge`` when missing, writes ``/etc/slurm/slurm.conf`` with one node, a ``debug`` partition and a fake
GPU gres, starts munged/slurmctld/slurmd and waits for the node to be idle) and, at the end,
``tests/slurm/stop_cluster.sh`` (stops those daemons by their PIDs). The test then runs the tiny demo
overlay with ``--workflow-profile workflow/profiles/slurm``, bounded by a timeout, and checks the outputs,
that every compute rule went through ``sbatch``, and that every job's MLflow run is nested under the
pipeline's parent run.

Settings only this throw-away cluster needs are given on the command line (see ``snakemake_cmd``):

* ``--slurm-status-command squeue``: accounting is off (``accounting_storage/none``), so ``sacct``
  answers "Slurm accounting storage is disabled"; ``squeue --states=all`` sees finished jobs for
  ``MinJobAge`` (600 s in the test's slurm.conf). The plugin falls back to ``sacct`` when
  ``MinJobAge < 3 * --slurm-init-seconds-before-status-checks``, so that one is short (1 s), which also
  keeps the test fast.
* ``--default-resources slurm_partition=debug ...``: the profile's partition is ``gpu``.
* ``--jobs 2 --retries 0``: two CPUs; a failing job fails the test at once.
* ``--set-resources train_teacher:gpu=1``: one rule asks for a GPU, which the plugin turns into
  ``--gpus=1``; the fake gres makes it schedulable (the job still trains on the CPU: no CUDA here).

Where this runs: root on Debian/Ubuntu (CI runs it as root). Without root the test is skipped locally
and fails in CI (``CI=true``); every other setup failure (apt unreachable, a daemon that does not start)
fails it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = ROOT / "tests" / "slurm"
PARTITION = "debug"
SNAKEMAKE_TIMEOUT_S = 900
START_TIMEOUT_S = 900  # includes apt-get install on a fresh machine
METHODS = ("vanilla", "dfa")  # tests/slurm/two_methods.yaml
# fixed (not a pytest tmp dir): a crashed session's daemons are found and stopped by the next start
STATE_DIR = Path(os.environ.get("DFAKD_SLURM_STATE", "/tmp/dfakd-slurm"))
STUDENT_DIR = "students/mnist5k/resnet20/resnet8/{method}/s0"
SLURM_RULES = ("train_teacher", "evaluate_teacher", "search", "distill", "evaluate_student")

pytestmark = pytest.mark.slow


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def cluster_env(state_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["DFAKD_SLURM_STATE"] = str(state_dir)
    env["DFAKD_SLURM_PARTITION"] = PARTITION
    env["PATH"] = f"{env.get('PATH', '')}:/usr/sbin:/sbin"
    return env


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node SLURM cluster; yields its state folder (pid files, daemon logs)."""
    if os.geteuid() != 0:
        reason = "the SLURM test needs root (apt-get install slurm-wlm munge, /etc/slurm, daemons)"
        if in_ci():
            pytest.fail(f"{reason}; CI must run it as root")
        pytest.skip(reason)
    state = STATE_DIR
    env = cluster_env(state)
    try:
        started = subprocess.run(
            ["bash", str(SLURM_DIR / "start_cluster.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        subprocess.run(["bash", str(SLURM_DIR / "stop_cluster.sh")], env=env, timeout=120)
        pytest.fail(f"start_cluster.sh did not finish in {START_TIMEOUT_S}s:\n{exc.stderr}")
    if started.returncode != 0:
        subprocess.run(["bash", str(SLURM_DIR / "stop_cluster.sh")], env=env, timeout=120)
        pytest.fail(
            f"the SLURM cluster did not start (exit {started.returncode}):\n"
            f"{started.stdout}\n{started.stderr}"
        )
    try:
        yield state
    finally:
        stopped = subprocess.run(
            ["bash", str(SLURM_DIR / "stop_cluster.sh")], env=env, capture_output=True, text=True, timeout=120
        )
        sys.stderr.write(stopped.stderr)


def snakemake_cmd(experiment: str, results_dir: Path, slurm_logs: Path) -> list[str]:
    return [
        sys.executable, "-m", "snakemake",
        "--workflow-profile", "workflow/profiles/slurm",
        "--configfile", "config/config.yaml", "tests/data/tiny_workflow.yaml", "tests/slurm/two_methods.yaml",
        "--config", f"experiment={experiment}", f"results_dir={results_dir}",
        "--jobs", "2",
        "--retries", "0",
        "--default-resources", f"slurm_partition={PARTITION}", "runtime=30", "mem_mb=2000",
        "--set-resources", "train_teacher:gpu=1",
        "--slurm-status-command", "squeue",
        "--slurm-init-seconds-before-status-checks", "1",
        "--slurm-logdir", str(slurm_logs),
        "--slurm-keep-successful-logs",
        "--slurm-delete-logfiles-older-than", "0",
    ]  # fmt: skip


def run_bounded(cmd: list[str], env: dict[str, str], log_path: Path, timeout: float) -> tuple[int, str]:
    """Run ``cmd`` in its own session with output to ``log_path``; on timeout interrupt it (Snakemake
    then cancels its SLURM jobs), kill what is left of its process group, and fail the test."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            pytest.fail(f"snakemake did not finish in {timeout}s:\n{tail(log_path)}")
    return rc, log_path.read_text()


def tail(path: Path, lines: int = 80) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def slurm_jobs(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """``scontrol show job`` fields of finished jobs (slurmctld keeps them for MinJobAge)."""
    jobs = {}
    for jid in job_ids:
        out = subprocess.run(
            ["scontrol", "--oneliner", "show", "job", jid], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, f"slurmctld does not know job {jid}: {out.stderr}"
        jobs[jid] = dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)
    return jobs


def test_demo_dag_through_slurm_profile(slurm_cluster: Path, tmp_path: Path) -> None:
    experiment = f"slurm-{uuid.uuid4().hex[:8]}"
    results_root = tmp_path / "results"
    out = results_root / experiment
    slurm_logs = tmp_path / "slurm_logs"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SLURM_"))}
    # sbatch --export=ALL: the jobs see this PATH, so their `dfakd` and python are the venv's
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}:/usr/sbin:/sbin"
    env["PYTHONUNBUFFERED"] = "1"

    t0 = time.monotonic()
    rc, log = run_bounded(
        snakemake_cmd(experiment, results_root, slurm_logs),
        env,
        tmp_path / "snakemake.log",
        SNAKEMAKE_TIMEOUT_S,
    )
    elapsed = time.monotonic() - t0
    assert rc == 0, f"snakemake failed (exit {rc}) after {elapsed:.0f}s:\n{tail(tmp_path / 'snakemake.log')}"
    print(f"\n[test_slurm] the demo DAG ran through SLURM in {elapsed:.0f}s")

    # ---- outputs
    summary = (out / "summary.md").read_text()
    for method in METHODS:
        assert re.search(rf"^\| {method} \| 1 \|", summary, re.M), f"{method} missing from summary.md"
        result = json.loads((out / STUDENT_DIR.format(method=method) / "result.json").read_text())
        assert result, method
        assert (out / STUDENT_DIR.format(method=method) / "eval.json").is_file()
    assert (out / "summary.csv").is_file()
    assert (out / "plots" / "accuracy.png").stat().st_size > 0
    assert (out / "teachers/mnist5k/resnet20/s0/eval.json").is_file()

    # ---- every compute rule went through sbatch: one kept SLURM log per job, named <jobid>.log
    submitted = dict(re.findall(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)", log))
    assert submitted, f"no SLURM submission in the snakemake log:\n{log[-3000:]}"
    logs_by_rule: dict[str, list[Path]] = {}
    for path in slurm_logs.rglob("*.log"):
        rule = path.relative_to(slurm_logs).parts[0].removeprefix("rule_")
        logs_by_rule.setdefault(rule, []).append(path)
    expected = {"train_teacher": 1, "evaluate_teacher": 1, "search": 1, "distill": 2, "evaluate_student": 2}
    assert {r: len(p) for r, p in logs_by_rule.items()} == expected, logs_by_rule
    assert set(logs_by_rule) == set(SLURM_RULES)
    job_ids = [p.stem for paths in logs_by_rule.values() for p in paths]
    assert sorted(job_ids) == sorted(submitted), (job_ids, submitted)
    # local rules stay local
    assert not {"prepare_data", "derive", "summary", "plots"} & set(logs_by_rule)

    # slurmctld still knows the finished jobs (MinJobAge): all COMPLETED, comments name their rules,
    # and train_teacher asked for the (fake) GPU
    jobs = slurm_jobs(job_ids)
    assert {j["JobState"] for j in jobs.values()} == {"COMPLETED"}, jobs
    assert {j["Partition"] for j in jobs.values()} == {PARTITION}, jobs
    for jid, job in jobs.items():
        rule = next(r for r, paths in logs_by_rule.items() if jid in {p.stem for p in paths})
        assert job["Comment"].startswith(f"rule_{rule}_wildcards_"), (rule, job["Comment"])
        # --gpus=1 for the rule asking gpu=1 only, granted from the fake gres
        assert (job.get("TresPerJob") == "gres:gpu:1") == (rule == "train_teacher"), (rule, job)

    # ---- MLflow: the store was created before the jobs (onstart), every job run is nested under the
    # pipeline's parent run, and the parent run is closed
    from mlflow.tracking import MlflowClient

    parent = json.loads((out / "mlflow_parent_run.json").read_text())
    client = MlflowClient(tracking_uri=parent["uri"])
    runs = client.search_runs([parent["experiment_id"]], max_results=1000)
    by_id = {r.info.run_id: r for r in runs}
    assert parent["run_id"] in by_id
    assert by_id[parent["run_id"]].data.tags.get("stage") == "pipeline"
    assert by_id[parent["run_id"]].info.status == "FINISHED"
    children = [r for r in runs if r.info.run_id != parent["run_id"]]
    stages = sorted(r.data.tags.get("stage", "?") for r in children)
    assert stages == sorted(["train", "search", *["distill"] * len(METHODS)]), stages
    for run in children:
        assert run.data.tags.get("mlflow.parentRunId") == parent["run_id"], (run.info.run_name, run.data.tags)
        assert run.info.status == "FINISHED", (run.info.run_name, run.info.status)

    # passed: drop the checkpoints (pytest keeps its last tmp folders); on failure they stay for a look
    shutil.rmtree(results_root)
