"""Tracking outages lose nothing: a real `mlflow server` on 127.0.0.1 killed mid-run and restarted, four
parallel jobs on one SQLite store, and `dfakd sync-mlflow` rebuilding runs idempotently."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import cli_env, run_cli, tiny_config, write_config, write_imagefolder
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` bound to 127.0.0.1 on a SQLite store that outlives restarts."""

    def __init__(self, base: Path):
        self.base, self.port, self.proc = base, _free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--backend-store-uri", f"sqlite:///{self.base / 'server.db'}",
            "--artifacts-destination", str(self.base / "artifacts"), "--workers", "1",
        ]  # fmt: skip
        log = open(self.base / "server.log", "a")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True, env=cli_env())
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert self.proc.poll() is None, (self.base / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not come up in 90 s"
            time.sleep(0.5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def _rows(path: Path) -> int:
    return max(0, len(path.read_text().splitlines()) - 1) if path.is_file() else 0


def _wait(cond, proc, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        if proc is not None and proc.poll() is not None:
            return
        time.sleep(0.05)


def _job_config(base: Path, epochs: int, **tracking) -> Path:
    images = write_imagefolder(base / "imgs", n_train=200, n_test=20)
    cfg = tiny_config(images.root, base / "results", epochs=epochs)
    cfg["runtime"]["threads"] = 1
    cfg["tracking"] = {"enabled": True, "experiment": "outage", **tracking}
    return write_config(base / "cfg.yaml", cfg)


def test_server_killed_mid_run_and_restarted_loses_nothing(tmp_path: Path):
    server = Server(tmp_path)
    server.start()
    epochs = 12
    cfg = _job_config(tmp_path, epochs, uri=server.uri, retries=1, backoff_s=0.2, timeout_s=2.0)
    run = tmp_path / "run"
    log = open(tmp_path / "job.log", "w")  # noqa: SIM115
    job = subprocess.Popen(
        [sys.executable, "-m", "dfakd", "train", "-c", str(cfg), "-o", str(run)],
        cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    try:
        _wait(lambda: _rows(run / "metrics.csv") >= 1, job, "the first epoch")
        server.kill()  # the tracking server dies mid-run
        down_at = _rows(run / "metrics.csv")
        _wait(lambda: _rows(run / "metrics.csv") >= down_at + 2, job, "two epochs without the server")
        server.start()  # and comes back
        assert job.wait(timeout=300) == 0, (tmp_path / "job.log").read_text()
    finally:
        if job.poll() is None:
            job.kill()
    stderr = (tmp_path / "job.log").read_text()
    assert "training goes on offline" in stderr or "kept in the results files" in stderr, stderr
    assert (run / "result.json").is_file()
    if "dfakd sync-mlflow" in stderr.splitlines()[-1]:  # the job ended before the server came back
        assert run_cli("sync-mlflow", run, cwd=tmp_path).returncode == 0
    try:
        client = MlflowClient(server.uri)
        run_id = json.loads((run / "mlflow_run.json").read_text())["run_id"]
        steps = sorted(m.step for m in client.get_metric_history(run_id, "test_acc1"))
        assert steps == list(range(1, epochs + 1)), "every epoch's metric must reach the server"
        logged = client.get_run(run_id)
        assert logged.info.status == "FINISHED"
        assert logged.data.params["recipe.epochs"] == str(epochs)
        assert "result.json" in {a.path for a in client.list_artifacts(run_id)}
    finally:
        server.kill()


def test_four_parallel_jobs_share_one_sqlite_store(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    cfg = _job_config(tmp_path, 2, uri=uri)
    init = run_cli(
        "tracking-init", "--experiment", "outage", "--results-dir", tmp_path / "results", "--uri", uri,
        "--run-file", tmp_path / "parent.json", cwd=tmp_path,
    )  # fmt: skip
    assert init.returncode == 0, init.stderr
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dfakd",
                "train",
                "-c",
                str(cfg),
                "--set",
                f"seed={i}",
                "--parent-run-file",
                str(tmp_path / "parent.json"),
                "-o",
                str(tmp_path / f"run{i}"),
            ],
            cwd=tmp_path,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(4)
    ]
    for job in jobs:
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, err
    client = MlflowClient(uri)
    parent = json.loads((tmp_path / "parent.json").read_text())
    runs = [r for r in client.search_runs([parent["experiment_id"]]) if r.info.run_id != parent["run_id"]]
    assert len(runs) == 4
    assert sorted(r.data.tags["seed"] for r in runs) == ["0", "1", "2", "3"]
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == parent["run_id"]
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "test_acc1")) == [1, 2]


def test_sync_mlflow_rebuilds_runs_idempotently(tmp_path: Path):
    cfg = _job_config(tmp_path, 2, uri=f"sqlite:///{tmp_path / 'original.db'}")
    assert run_cli("train", "-c", cfg, "-o", tmp_path / "results" / "run", cwd=tmp_path).returncode == 0
    rebuilt = f"sqlite:///{tmp_path / 'rebuilt.db'}"

    def snapshot():
        client = MlflowClient(rebuilt)
        exp = client.get_experiment_by_name("outage")
        runs = client.search_runs([exp.experiment_id])
        return [
            (r.info.status, dict(r.data.params), {k: len(client.get_metric_history(r.info.run_id, k))
                                                  for k in r.data.metrics})
            for r in runs
        ]  # fmt: skip

    for _ in range(2):
        proc = run_cli("sync-mlflow", tmp_path / "results", "--uri", rebuilt, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    first = snapshot()
    assert run_cli("sync-mlflow", tmp_path / "results", "--uri", rebuilt, cwd=tmp_path).returncode == 0
    assert snapshot() == first
    assert len(first) == 1
    status, params, metric_counts = first[0]
    assert status == "FINISHED" and params["recipe.epochs"] == "2"
    assert metric_counts["test_acc1"] == 2 and metric_counts["best_acc1"] == 1
