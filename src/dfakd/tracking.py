"""MLflow tracking: the one module that talks to MLflow.

Results files are the source of truth; MLflow is the view over them. Each job logs its flattened config
as parameters, per-epoch metrics with ``step``, tags (stage, dataset, model, seed, ...) and its result
files as artifacts. The store is ``tracking.uri`` from the config, else ``$MLFLOW_TRACKING_URI``, else an
embedded SQLite file ``<results_dir>/mlflow.db`` (nothing to start).

Tracking never stops training. Every call is retried with exponential backoff (``tracking.retries``,
``tracking.backoff_s``, ``tracking.timeout_s`` per HTTP request); when the store stays unreachable (a
server down or slow, SQLite locked) the job goes on *offline*, and what it could not send is replayed
from its results files as soon as a later call gets through, at the latest when the job ends. What is
still unsent then is left for ``dfakd sync-mlflow RESULTS_DIR``, which (re)builds every job's run from
its results files, idempotently. A job's ``mlflow_run.json`` holds what a replay needs (store, run id,
name, tags).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dfakd import config as config_mod
from dfakd.files import atomic_write_json, atomic_write_text

RUN_FILE = "mlflow_run.json"
METRIC_FILES = ("metrics.csv", "search_metrics.csv")
ARTIFACTS = (
    "config.yaml", "metrics.csv", "result.json", "search_metrics.csv", "search.json", "alpha_trajectory.csv",
    "alphas.png", "alpha_trajectory.png",
)  # fmt: skip
RESULT_FILES = ("result.json", "search.json")
SUPERSEDED = "superseded"  # the folder where a retrained job's earlier run is set aside
_MAX_PARAM_LEN = 6000


def resolve_uri(uri: str | None, results_dir: str | Path) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(results_dir).resolve() / 'mlflow.db'}"


def tracking_uri(cfg: dict[str, Any]) -> str:
    return resolve_uri(cfg["tracking"]["uri"], cfg["results_dir"])


def _prepare_client_env(timeout_s: float) -> None:
    """Our own retries decide; MLflow's HTTP client would otherwise retry for minutes per call."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(max(1, timeout_s))))
    for name in ("alembic", "mlflow", "mlflow.store", "mlflow.tracking", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def with_retries(fn: Callable[[], Any], attempts: int, backoff_s: float) -> Any:
    """Call ``fn`` up to ``attempts`` times, sleeping ``backoff_s * 2**i`` between tries."""
    for i in range(attempts):
        try:
            return fn()
        except Exception:
            if i == attempts - 1:
                raise
            time.sleep(backoff_s * 2**i)
    return None


def ensure_experiment(uri: str, name: str, results_dir: str | Path) -> str:
    """Create the experiment (and, for SQLite, the store) if needed; return its id."""
    client = client_for(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        artifact_location = (Path(results_dir).resolve() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # another job created it between our lookup and create
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def result_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The final figures of a ``result.json`` that are logged as metrics (at step = epochs)."""
    return {
        k: float(v)
        for k, v in result.items()
        if k.endswith(("acc1", "acc5", "_loss")) and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _read_metric_rows(path: Path) -> list[tuple[int, dict[str, float]]]:
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(row.pop("epoch"))
            rows.append((step, {k: float(v) for k, v in row.items() if v not in ("", None)}))
    return rows


def sync_run_dir(run_dir: str | Path, uri: str | None = None, terminate: bool = True) -> str:
    """Make the MLflow run of one job folder match its results files; returns the run id.

    Creates the run if the store lacks it, logs the parameters (``config.yaml``), every metric step
    (``metrics.csv`` / ``search_metrics.csv``, and ``result.json``'s final figures) that the run does not
    have yet, the result files as artifacts, and, with ``terminate``, FINISHED when the job finished.
    Running it twice changes nothing the second time.
    """
    import yaml
    from mlflow.entities import Metric, Param

    from dfakd.errors import DfakdError

    run_dir = Path(run_dir)
    info = json.loads((run_dir / RUN_FILE).read_text())
    lacking = {"uri", "experiment", "results_dir", "run_name", "tags"} - set(info)
    if lacking:
        raise DfakdError(
            f"{run_dir / RUN_FILE} lacks {', '.join(sorted(lacking))} (written by an older dfakd)"
        )
    uri = uri or info["uri"]
    _prepare_client_env(10)
    client = client_for(uri)
    exp_id = ensure_experiment(uri, info["experiment"], info["results_dir"])
    run_id = info.get("run_id") if info.get("uri") == uri else None
    if run_id:
        try:
            client.get_run(run_id)
        except Exception:
            run_id = None
    if run_id is None:
        run_id = client.create_run(exp_id, tags=info["tags"], run_name=info["run_name"]).info.run_id
        _write_run_file(run_dir, {**info, "uri": uri, "run_id": run_id, "experiment_id": exp_id})
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        flat = config_mod.flatten(yaml.safe_load(cfg_path.read_text()))
        have = client.get_run(run_id).data.params
        params = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in flat.items() if k not in have]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i : i + 100])

    wanted: list[tuple[int, dict[str, float]]] = []
    for name in METRIC_FILES:
        if (run_dir / name).is_file():
            wanted += _read_metric_rows(run_dir / name)
    result_path = next((run_dir / n for n in RESULT_FILES if (run_dir / n).is_file()), None)
    if result_path is not None and result_path.name == "result.json":
        result = json.loads(result_path.read_text())
        wanted.append((int(result.get("epochs", 0)), result_metrics(result)))
    logged: dict[str, set[int]] = {}
    missing = []
    now = int(time.time() * 1000)
    for step, values in wanted:
        for key, value in values.items():
            if key not in logged:
                logged[key] = {m.step for m in client.get_metric_history(run_id, key)}
            if step not in logged[key]:
                missing.append(Metric(key, value, now, step))
                logged[key].add(step)
    for i in range(0, len(missing), 500):
        client.log_batch(run_id, metrics=missing[i : i + 500])
    if terminate and result_path is not None:
        for name in ARTIFACTS:
            if (run_dir / name).is_file():
                client.log_artifact(run_id, str(run_dir / name))
        client.set_terminated(run_id, status="FINISHED")
    return run_id


def sync_results(results_dir: str | Path, uri: str | None = None) -> list[tuple[Path, str | Exception]]:
    """``dfakd sync-mlflow``: sync every job folder under ``results_dir``; (folder, run id or error)."""
    out: list[tuple[Path, str | Exception]] = []
    for path in sorted(Path(results_dir).rglob(RUN_FILE)):
        if SUPERSEDED in path.relative_to(results_dir).parts:
            continue  # an earlier run of a job, set aside when it was retrained
        try:
            out.append((path.parent, sync_run_dir(path.parent, uri)))
        except Exception as exc:  # one unreachable or stale folder must not stop the others
            out.append((path.parent, exc))
    return out


def _write_run_file(run_dir: Path, info: dict[str, Any]) -> None:
    atomic_write_json(run_dir / RUN_FILE, info)


class Tracker:
    """One MLflow run for one job. With ``tracking.enabled: false`` every call is a no-op."""

    def __init__(self, cfg: dict[str, Any], run_dir: Path, run_name: str, tags: dict[str, str]) -> None:
        tcfg = cfg["tracking"]
        self.enabled = bool(tcfg["enabled"])
        self.run_dir = Path(run_dir)
        self.run_id: str | None = None
        self.uri = tracking_uri(cfg) if self.enabled else None
        self.online = False
        if not self.enabled:
            return
        _prepare_client_env(tcfg["timeout_s"])
        self.attempts, self.backoff_s = tcfg["retries"] + 1, tcfg["backoff_s"]
        all_tags = {**{k: str(v) for k, v in tcfg["tags"].items()}, **tags}
        if tcfg["parent_run_id"]:
            all_tags["mlflow.parentRunId"] = tcfg["parent_run_id"]
        run_file = self.run_dir / RUN_FILE
        saved = json.loads(run_file.read_text()) if run_file.is_file() else {}
        self.info = {
            "uri": self.uri,
            "experiment": tcfg["experiment"],
            "results_dir": str(Path(cfg["results_dir"]).resolve()),
            "run_name": run_name,
            "tags": all_tags,
            "run_id": saved.get("run_id") if saved.get("uri") == self.uri else None,
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _write_run_file(self.run_dir, self.info)
        self._reconnect(attempts=self.attempts)
        if self.online:
            self._call("mark the run RUNNING", lambda c: c.update_run(self.run_id, status="RUNNING"))

    def _reconnect(self, attempts: int) -> bool:
        """(Re)build the run from the results files written so far; on success the tracker is online."""
        try:
            self.run_id = with_retries(
                lambda: sync_run_dir(self.run_dir, self.uri, terminate=False), attempts, self.backoff_s
            )
            self.online = True
        except Exception as exc:
            self._warn(
                f"MLflow at {self.uri} unreachable ({exc.__class__.__name__}); training goes on offline"
            )
            self.online = False
        return self.online

    def _warn(self, message: str) -> None:
        print(f"dfakd: warning: {message}", file=sys.stderr, flush=True)

    def _call(self, what: str, fn: Callable[[Any], Any]) -> None:
        if not self.enabled:
            return
        if not self.online and not self._reconnect(attempts=1):
            return
        try:
            with_retries(lambda: fn(client_for(self.uri)), self.attempts, self.backoff_s)
        except Exception as exc:
            self._warn(f"could not {what} ({exc.__class__.__name__}); kept in the results files for replay")
            self.online = False

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._call(f"log metrics of step {step}", lambda c: c.log_batch(self.run_id, metrics=batch))

    def finish(self, status: str = "FINISHED") -> None:
        """Replay what is missing, log the result files, and close the run."""
        if not self.enabled:
            return
        if status == "FINISHED":
            try:
                self.run_id = with_retries(
                    lambda: sync_run_dir(self.run_dir, self.uri), self.attempts, self.backoff_s
                )
                self.online = True
                return
            except Exception as exc:
                self.online = False
                self._warn(
                    f"MLflow still unreachable at the end ({exc.__class__.__name__}); run "
                    f"`dfakd sync-mlflow {shlex.quote(str(self.run_dir))}` once it is back"
                )
                return
        self._call(f"mark the run {status}", lambda c: c.set_terminated(self.run_id, status=status))

    def abort(self, exc: BaseException) -> None:
        """Close the run of a job that stopped early: KILLED if interrupted (SIGTERM, Ctrl-C), else FAILED."""
        from dfakd.training.preemption import Preempted

        self.finish("KILLED" if isinstance(exc, (Preempted, KeyboardInterrupt)) else "FAILED")

    def describe(self) -> str:
        if not self.enabled:
            return "tracking disabled"
        state = "" if self.online else " (offline: run `dfakd sync-mlflow` to send what is missing)"
        return f"MLflow run {self.run_id} in {self.uri}{state}"


def start_pipeline_run(
    uri: str | None, experiment: str, results_dir: str | Path, run_file: str | Path, name: str
) -> dict[str, Any]:
    """Create the store and experiment (once, before parallel jobs start) and a parent run for one
    pipeline invocation; its id goes to ``run_file`` for the jobs to nest under.

    Tracking never stops a pipeline: when the store is unreachable or broken, ``run_file`` says so
    (``run_id`` null, ``offline`` true, the error), the jobs train offline with no parent run, and
    ``dfakd sync-mlflow`` replays them later. A run file left by an earlier invocation is replaced either way.
    """

    _prepare_client_env(10)
    uri = resolve_uri(uri, results_dir)
    Path(results_dir).mkdir(parents=True, exist_ok=True)
    try:
        exp_id = ensure_experiment(uri, experiment, results_dir)
        run = client_for(uri).create_run(exp_id, run_name=name, tags={"stage": "pipeline"})
        info: dict[str, Any] = {"uri": uri, "run_id": run.info.run_id, "experiment_id": exp_id}
    except Exception as exc:
        info = {"uri": uri, "run_id": None, "offline": True, "error": exc.__class__.__name__}
    atomic_write_text(run_file, json.dumps(info) + "\n")
    return info


def finish_pipeline_run(run_file: str | Path, status: str) -> str | None:
    """Close the parent run; returns why it could not (never raises for an unreachable store). Nothing to
    do when there is none (the store was unreachable when the pipeline started, which it said then)."""
    _prepare_client_env(10)
    info = json.loads(Path(run_file).read_text())
    if not info.get("run_id"):
        return None
    try:
        client_for(info["uri"]).set_terminated(info["run_id"], status=status)
    except Exception as exc:
        return f"MLflow at {info['uri']} unreachable ({exc.__class__.__name__})"
    return None
