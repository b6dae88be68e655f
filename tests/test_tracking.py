"""MLflow tracking of a real (tiny) training job, read back from a real SQLite store."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import FolderFiles, tiny_config, write_config

from dfakd import __version__, config, jobs, tracking
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
    assert run.info.run_name == "train-imagefolder-resnet8-s0"

    # params: what decided the run (its settings, as its checkpoint stores them), nothing operational
    params = run.data.params
    settings = json.loads((run_dir / "settings.json").read_text())
    assert settings == torch.load(run_dir / "checkpoint.pt", weights_only=True)["settings"]
    assert params == {k: str(v) for k, v in settings.items()}
    assert params["recipe.lr"] == "0.05" and params["recipe.epochs"] == str(EPOCHS)
    assert params["model.arch"] == "resnet8" and params["dataset.name"] == "imagefolder"
    assert params["recipe.milestones"] == "[1]"
    assert not [k for k in params if k.split(".")[0] in ("tracking", "distill", "search", "derive")]
    assert "runtime.device" not in params and "runtime.threads" not in params

    tags = run.data.tags
    assert tags["stage"] == "train" and tags["dataset"] == "imagefolder"
    assert tags["seed"] == "0" and tags["model"] == "resnet8" and tags["purpose"] == "test"
    assert "mlflow.parentRunId" not in tags
    assert tags["dfakd.current"] == "true" and tags["dfakd.version"] == __version__
    assert "dfakd" in tags["dfakd.command"] or "pytest" in tags["dfakd.command"]
    assert tags["mlflow.source.name"]
    state = tracking.git_state()
    if state is not None:  # a git checkout (the test suite's usual case)
        assert tags["dfakd.git_commit"] == tags["mlflow.source.git.commit"] == state[0]
        assert tags["dfakd.git_dirty"] in ("true", "false")
    assert "tags.dfakd.current" in exp.tags["mlflow.note.content"]
    assert tracking.RUNS_VIEW in exp.tags["mlflow.note.content"]  # how to reach the runs table
    # the kind tag for UIs that read it; MLflow 3.17's takes its view from the URL the note names
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

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


def test_runs_url_opens_the_runs_table():
    """The MLflow 3.17 UI (hash-routed) shows the classic ML runs table for this query, whatever view the
    browser last used; without it a fresh browser lands on the GenAI overview."""
    assert tracking.RUNS_VIEW == "workflowType=machine_learning"
    assert (
        tracking.runs_url("7") == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    )
    assert tracking.runs_url("7", "http://host:5055/").startswith("http://host:5055/#/experiments/7/runs?")


def test_git_state_without_git(monkeypatch: pytest.MonkeyPatch):
    tracking.git_state.cache_clear()
    monkeypatch.setenv("PATH", "/nonexistent")
    try:
        assert tracking.git_state() is None
        assert "dfakd.git_commit" not in tracking.provenance_tags()
    finally:
        tracking.git_state.cache_clear()


def test_retrained_job_marks_its_earlier_run_superseded(imagefolder: FolderFiles, tmp_path: Path):
    cfg = _cfg(imagefolder, tmp_path)
    run_dir = tmp_path / "results" / "job"
    jobs.train(cfg, run_dir)
    first = _run_id(run_dir)
    cfg["recipe"]["lr"] = 0.02
    jobs.train(cfg, run_dir, retrain=True)
    second = _run_id(run_dir)
    assert second != first
    client = _client(tracking_uri(cfg))
    exp_id = client.get_experiment_by_name("tests").experiment_id
    assert client.get_run(first).data.tags["dfakd.current"] == "false"
    current = client.search_runs([exp_id], filter_string="tags.dfakd.current = 'true'")
    assert [r.info.run_id for r in current] == [second]
    assert client.get_run(second).data.params["recipe.lr"] == "0.02"
    assert client.get_run(first).data.params["recipe.lr"] == "0.05"
    (aside,) = (run_dir / "superseded").iterdir()
    assert json.loads((aside / RUN_FILE).read_text())["tags"]["dfakd.current"] == "false"


def test_evaluation_goes_to_the_jobs_run(imagefolder: FolderFiles, tmp_path: Path):
    cfg = _cfg(imagefolder, tmp_path)
    run_dir = tmp_path / "results" / "job"
    jobs.train(cfg, run_dir)
    evaluation = jobs.evaluate_checkpoint(cfg, run_dir / "best.pt", run_dir / "eval.json")
    client = _client(tracking_uri(cfg))
    run = client.get_run(_run_id(run_dir))
    assert run.data.metrics["eval_top1"] == evaluation["top1"]
    assert "eval.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    # a store that is gone never fails the evaluation
    (tmp_path / "results" / "mlflow.db").write_bytes(b"garbage" * 100)
    assert (
        jobs.evaluate_checkpoint(cfg, run_dir / "best.pt", run_dir / "eval.json")["top1"]
        == evaluation["top1"]
    )


def test_lazy_parent_run(imagefolder: FolderFiles, tmp_path: Path):
    """`tracking-init` opens no parent run: the first job that trains does, later jobs nest under it."""
    cfg = _cfg(imagefolder, tmp_path)
    uri = tracking_uri(cfg)
    run_file = tmp_path / "results" / "parent.json"
    info = tracking.start_pipeline_run(None, "tests", cfg["results_dir"], run_file, "pipeline tests")
    assert info["run_id"] is None and not info.get("offline")
    client = _client(uri)
    exp_id = client.get_experiment_by_name("tests").experiment_id
    assert client.search_runs([exp_id]) == []  # an invocation that trains nothing adds no parent run
    cfg["tracking"]["parent_run_file"] = str(run_file)
    for seed in (0, 1):
        cfg["seed"] = seed
        jobs.train(cfg, tmp_path / "results" / f"s{seed}")
    parent = json.loads(run_file.read_text())["run_id"]
    assert parent is not None
    for seed in (0, 1):
        tags = client.get_run(_run_id(tmp_path / "results" / f"s{seed}")).data.tags
        assert tags["mlflow.parentRunId"] == parent
    summary = tmp_path / "summary.md"
    summary.write_text("# summary\n")
    assert tracking.finish_pipeline_run(run_file, "FINISHED", [(summary, None)]) is None
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(parent).data.tags["stage"] == "pipeline"
    assert [a.path for a in client.list_artifacts(parent)] == ["summary.md"]


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_moved_results_folder_keeps_its_artifacts_to_itself(imagefolder: FolderFiles, tmp_path: Path):
    import shutil

    from conftest import run_cli

    cfg = _cfg(imagefolder, tmp_path)
    original = tmp_path / "results"
    jobs.train(cfg, original / "a")
    moved = tmp_path / "moved" / "results"
    moved.parent.mkdir()
    shutil.copytree(original, moved)
    before = _tree(original)

    cfg["results_dir"] = str(moved)
    jobs.train(cfg, moved / "b")  # a new job, from the copy
    cfg["seed"] = 1
    state = torch.load(moved / "a" / "checkpoint.pt", weights_only=True)
    torch.save({**state, "finished": False}, moved / "a" / "checkpoint.pt")
    (moved / "a" / "result.json").unlink()
    cfg["seed"] = 0
    jobs.train(cfg, moved / "a")  # an interrupted job of the original, finished in the copy
    synced = run_cli("sync-mlflow", moved, cwd=tmp_path)
    assert synced.returncode == 0, synced.stdout + synced.stderr

    assert _tree(original) == before  # the original is untouched: store, artifacts, run files
    client = _client(f"sqlite:///{moved / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tests")
    assert exp.artifact_location == (moved / "mlartifacts").as_uri()
    for job in ("a", "b"):
        info = json.loads((moved / job / RUN_FILE).read_text())
        assert info["uri"] == f"sqlite:///{moved / 'mlflow.db'}" and info["results_dir"] == str(moved)
        run = client.get_run(info["run_id"])
        assert run.info.artifact_uri.startswith((moved / "mlartifacts").as_uri())
        assert run.info.status == "FINISHED"
        local = Path(client.download_artifacts(run.info.run_id, "result.json", str(tmp_path / f"dl-{job}")))
        assert (
            json.loads(local.read_text())["best_acc1"]
            == json.loads((moved / job / "result.json").read_text())["best_acc1"]
        )
    assert len(client.search_runs([exp.experiment_id])) == 2  # job a kept its run in the copy
    assert (moved / "mlartifacts").is_dir()
    relocated = run_cli("relocate-mlflow", moved, cwd=tmp_path)
    assert relocated.returncode == 0 and "nothing to change" in relocated.stdout, relocated.stdout


def test_relocate_points_a_copied_parent_run_file_at_the_copy(tmp_path: Path):
    """A copied results folder's `mlflow_parent_run.json` names the original's default store until
    `relocate-mlflow` runs; a server URI is left alone."""
    from conftest import run_cli

    original, copy = tmp_path / "orig" / "results", tmp_path / "copy" / "results"
    copy.mkdir(parents=True)
    info = {"uri": tracking.default_uri(original), "run_id": "abc", "experiment_id": "1"}
    (copy / tracking.PARENT_RUN_FILE).write_text(json.dumps(info) + "\n")
    done = run_cli("relocate-mlflow", copy, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    moved = json.loads((copy / tracking.PARENT_RUN_FILE).read_text())
    assert moved == {**info, "uri": tracking.default_uri(copy)}
    again = run_cli("relocate-mlflow", copy, cwd=tmp_path)
    assert "nothing to change" in again.stdout

    server = {**info, "uri": "http://mlflow.example:5000"}
    (copy / tracking.PARENT_RUN_FILE).write_text(json.dumps(server) + "\n")
    run_cli("relocate-mlflow", copy, cwd=tmp_path)
    assert json.loads((copy / tracking.PARENT_RUN_FILE).read_text()) == server
