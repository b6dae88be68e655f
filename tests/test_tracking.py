"""MLflow tracking of a real (tiny) training job, read back from a real SQLite store."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import FolderFiles, tiny_config, write_config

from dfakd import config, jobs
from dfakd.errors import DfakdError
from dfakd.tracking import RUN_FILE, ensure_experiment, tracking_uri

pytestmark = pytest.mark.slow

EPOCHS = 2


def _cfg(imagefolder: FolderFiles, tmp_path: Path, **tracking) -> dict:
    raw = tiny_config(imagefolder.root, tmp_path / "results", epochs=EPOCHS)
    raw["tracking"] = {"enabled": True, "experiment": "tests", **tracking}
    return config.load([write_config(tmp_path / "cfg.yaml", raw)])


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _run_id(run_dir: Path) -> str:
    return json.loads((run_dir / RUN_FILE).read_text())["run_id"]


def _test_acc1_csv(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [float(r["test_acc1"]) for r in csv.DictReader(f)]


def test_train_job_logged_to_sqlite(imagefolder: FolderFiles, tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    cfg = _cfg(imagefolder, tmp_path, uri=uri, tags={"purpose": "test"})
    run_dir = tmp_path / "run"
    result = jobs.train(cfg, run_dir)

    client = _client(uri)
    exp = client.get_experiment_by_name("tests")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [_run_id(run_dir)]
    run = client.get_run(runs[0].info.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "train-resnet8-s0"

    params = run.data.params
    flat = config.flatten(cfg)
    assert set(flat) <= set(params)
    assert params["recipe.lr"] == "0.05" and params["recipe.epochs"] == str(EPOCHS)
    assert params["model.arch"] == "resnet8" and params["dataset.name"] == "imagefolder"
    assert params["recipe.milestones"] == "[1]" and params["tracking.uri"] == uri

    tags = run.data.tags
    assert tags["stage"] == "train" and tags["dataset"] == "imagefolder"
    assert tags["seed"] == "0" and tags["model"] == "resnet8" and tags["purpose"] == "test"
    assert "mlflow.parentRunId" not in tags

    history = client.get_metric_history(run.info.run_id, "test_acc1")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == _test_acc1_csv(run_dir)
    for name in ("train_loss", "test_loss", "test_acc5", "lr", "train_acc1"):
        assert len(client.get_metric_history(run.info.run_id, name)) == EPOCHS, name
    assert run.data.metrics["best_acc1"] == result["best_acc1"]
    assert run.data.metrics["last_acc1"] == result["last_acc1"]

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"result.json", "metrics.csv", "config.yaml"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "result.json", str(tmp_path / "dl")))
    assert json.loads(local.read_text()) == json.loads((run_dir / "result.json").read_text())


def test_parent_run_nests_job_in_default_store(imagefolder: FolderFiles, tmp_path: Path):
    cfg = _cfg(imagefolder, tmp_path)  # tracking.uri null: <results_dir>/mlflow.db
    uri = tracking_uri(cfg)
    assert uri == f"sqlite:///{(tmp_path / 'results' / 'mlflow.db').resolve()}"
    client = _client(uri)
    exp_id = ensure_experiment(uri, "tests", cfg["results_dir"])
    parent = client.create_run(exp_id, run_name="pipeline").info.run_id

    cfg["tracking"]["parent_run_id"] = parent
    jobs.train(cfg, tmp_path / "child")
    assert (tmp_path / "results" / "mlflow.db").is_file()
    child = client.get_run(_run_id(tmp_path / "child"))
    assert child.info.experiment_id == exp_id
    assert child.data.tags["mlflow.parentRunId"] == parent
    found = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert [r.info.run_id for r in found] == [child.info.run_id]
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"result.json", "metrics.csv"} <= artifacts
    # artifacts live beside the store, not in the working directory
    assert (tmp_path / "results" / "mlartifacts").is_dir()


def test_resumed_job_keeps_its_run(imagefolder: FolderFiles, tmp_path: Path):
    cfg = _cfg(imagefolder, tmp_path)
    run_dir = tmp_path / "run"
    jobs.train(cfg, run_dir)
    first = _run_id(run_dir)
    # as if killed after its last epoch's checkpoint: not marked finished, no result.json yet
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    torch.save({**state, "finished": False}, run_dir / "checkpoint.pt")
    (run_dir / "result.json").unlink()
    jobs.train(cfg, run_dir)

    assert _run_id(run_dir) == first
    client = _client(tracking_uri(cfg))
    assert len(client.search_runs([client.get_experiment_by_name("tests").experiment_id])) == 1
    run = client.get_run(first)
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(first, "test_acc1"))
    assert steps == list(range(1, EPOCHS + 1))  # each epoch once, none repeated


def test_failed_job_marks_run_failed(imagefolder: FolderFiles, tmp_path: Path):
    cfg = _cfg(imagefolder, tmp_path)
    cfg["recipe"]["lr"] = 1e30  # diverges: the loss of the second step is not finite
    with pytest.raises(DfakdError, match="non-finite loss"):
        jobs.train(cfg, tmp_path / "run")
    run = _client(tracking_uri(cfg)).get_run(_run_id(tmp_path / "run"))
    assert run.info.status == "FAILED"
    assert not (tmp_path / "run" / "result.json").exists()
