"""MLflow tracking: the one module that talks to MLflow.

Results files are the source of truth; MLflow is the view over them. Each job logs its flattened config
as parameters, per-epoch metrics with ``step``, tags (stage, dataset, model, seed, ...) and its result
files as artifacts. The store is ``tracking.uri`` from the config, else ``$MLFLOW_TRACKING_URI``, else an
embedded SQLite file ``<results_dir>/mlflow.db`` (nothing to start). A job remembers its run id in
``<run_dir>/mlflow_run.json`` so that a resumed job keeps logging to the same run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from dfakd import config as config_mod

RUN_FILE = "mlflow_run.json"
_MAX_PARAM_LEN = 6000


def resolve_uri(uri: str | None, results_dir: str | Path) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(results_dir).resolve() / 'mlflow.db'}"


def tracking_uri(cfg: dict[str, Any]) -> str:
    return resolve_uri(cfg["tracking"]["uri"], cfg["results_dir"])


def _quiet_mlflow_logs() -> None:
    for name in ("alembic", "mlflow", "mlflow.store", "mlflow.tracking"):
        logging.getLogger(name).setLevel(logging.WARNING)


def ensure_experiment(uri: str, name: str, results_dir: str | Path) -> str:
    """Create the experiment (and, for SQLite, the store) if needed; return its id."""
    _quiet_mlflow_logs()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
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


class Tracker:
    """One MLflow run for one job. With ``tracking.enabled: false`` every call is a no-op."""

    def __init__(self, cfg: dict[str, Any], run_dir: Path, run_name: str, tags: dict[str, str]) -> None:
        self.enabled = bool(cfg["tracking"]["enabled"])
        self.run_dir = Path(run_dir)
        self.run_id: str | None = None
        self.uri = tracking_uri(cfg) if self.enabled else None
        if not self.enabled:
            return
        from mlflow.tracking import MlflowClient

        exp_id = ensure_experiment(self.uri, cfg["tracking"]["experiment"], cfg["results_dir"])
        self.client = MlflowClient(tracking_uri=self.uri)
        run_file = self.run_dir / RUN_FILE
        if run_file.is_file():
            saved = json.loads(run_file.read_text())
            if saved.get("uri") == self.uri:
                self.run_id = saved["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                return
        all_tags = {**{k: str(v) for k, v in cfg["tracking"]["tags"].items()}, **tags}
        parent = cfg["tracking"]["parent_run_id"]
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(exp_id, tags=all_tags, run_name=run_name)
        self.run_id = run.info.run_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps({"uri": self.uri, "run_id": self.run_id, "experiment_id": exp_id}))
        self.log_params(config_mod.flatten(cfg))

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        batch = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(batch), 100):
            self.client.log_batch(self.run_id, params=batch[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifacts(self, paths: list[Path]) -> None:
        if not self.enabled:
            return
        for path in paths:
            if Path(path).is_file():
                self.client.log_artifact(self.run_id, str(path))

    def set_tags(self, tags: dict[str, str]) -> None:
        if not self.enabled:
            return
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            self.client.set_terminated(self.run_id, status=status)

    def abort(self, exc: BaseException) -> None:
        """Close the run of a job that stopped early: KILLED if interrupted (SIGTERM, Ctrl-C), else FAILED."""
        from dfakd.training.preemption import Preempted

        self.finish("KILLED" if isinstance(exc, (Preempted, KeyboardInterrupt)) else "FAILED")

    def describe(self) -> str:
        if not self.enabled:
            return "tracking disabled"
        return f"MLflow run {self.run_id} in {self.uri}"


def start_pipeline_run(
    uri: str | None, experiment: str, results_dir: str | Path, run_file: str | Path, name: str
) -> dict[str, str]:
    """Create the store and experiment (once, before parallel jobs start) and a parent run for one
    pipeline invocation; its id goes to ``run_file`` for the jobs to nest under."""
    from mlflow.tracking import MlflowClient

    from dfakd.training.checkpoint import atomic_write_text

    uri = resolve_uri(uri, results_dir)
    Path(results_dir).mkdir(parents=True, exist_ok=True)
    exp_id = ensure_experiment(uri, experiment, results_dir)
    run = MlflowClient(tracking_uri=uri).create_run(exp_id, run_name=name, tags={"stage": "pipeline"})
    info = {"uri": uri, "run_id": run.info.run_id, "experiment_id": exp_id}
    atomic_write_text(run_file, json.dumps(info) + "\n")
    return info


def finish_pipeline_run(run_file: str | Path, status: str) -> None:
    from mlflow.tracking import MlflowClient

    info = json.loads(Path(run_file).read_text())
    MlflowClient(tracking_uri=info["uri"]).set_terminated(info["run_id"], status=status)
