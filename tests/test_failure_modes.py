"""Numerical faults, writes killed half-way, and the security rules (safe loading, no secrets logged,
no path traversal through workflow ids)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_config, write_config, write_imagefolder
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path: Path):
    images = write_imagefolder(tmp_path / "imgs", n_train=32, n_test=4)
    # epoch 1 trains normally; from epoch 2 the lr is multiplied by 1e30 and the loss blows up
    cfg = tiny_config(images.root, tmp_path / "results", epochs=3, milestones=[1], gamma=1.0e30)
    cfg_path = write_config(tmp_path / "cfg.yaml", cfg)
    proc = run_cli("train", "-c", cfg_path, "-o", tmp_path / "run", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert re.search(r"non-finite loss \((nan|inf|-inf)\) at epoch 2, step \d+", line), line
    assert "last good checkpoint is kept in" in line and "Traceback" not in proc.stderr
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["trainable"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "result.json").exists()


WRITER = textwrap.dedent(
    """
    import sys, torch
    from dfakd.files import atomic_save
    target = sys.argv[1]
    for version in range(1_000_000):
        atomic_save({"version": version, "payload": torch.full((4_000_000,), float(version))}, target)
        print(version, flush=True)
    """
)


@pytest.mark.parametrize("delay", [0.05, 0.3, 0.9])
def test_a_write_killed_half_way_never_leaves_a_file_that_looks_complete(tmp_path: Path, delay: float):
    target = tmp_path / "checkpoint.pt"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()  # one complete version exists
    time.sleep(delay)  # somewhere inside a later write
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    state = torch.load(target, weights_only=True)  # the visible file is always a whole checkpoint
    assert torch.equal(state["payload"], torch.full((4_000_000,), float(state["version"])))
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert all(n.startswith(".checkpoint.pt.") and n.endswith(".tmp") for n in leftovers), leftovers


def test_every_torch_load_in_the_package_is_weights_only():
    calls = []
    for path in (ROOT / "src" / "dfakd").rglob("*.py"):
        for match in re.finditer(r"(?<!`)torch\.load\(([^)]*)\)", path.read_text()):  # code, not docs
            calls.append((path.name, match.group(1)))
    assert calls, "the package loads checkpoints somewhere"
    assert all("weights_only=True" in args for _, args in calls), calls


def test_no_environment_variable_or_secret_reaches_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    secret = "s3cr3t-token-123"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("DFAKD_API_TOKEN", secret)
    images = write_imagefolder(tmp_path / "imgs", n_train=16, n_test=4)
    cfg = tiny_config(images.root, tmp_path / "results", epochs=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg["tracking"] = {"enabled": True, "uri": uri, "experiment": "secrets"}
    proc = subprocess.run(
        [sys.executable, "-m", "dfakd", "train", "-c", str(write_config(tmp_path / "c.yaml", cfg)),
         "-o", str(tmp_path / "run")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(uri)
    run = client.get_run(json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"])
    everything = json.dumps([run.data.params, run.data.tags])
    assert secret not in everything
    assert all(not k.startswith(("env", "AWS", "DFAKD_")) for k in run.data.params)
    # the params are the job's settings (what decided it), nothing operational such as tracking.*
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert set(run.data.params) == set(settings) and not any(k.startswith("tracking.") for k in settings)


@pytest.mark.parametrize("bad_id", ["..", "../etc", ".hidden", "a/b", "x;rm -rf y", "$(id)"])
def test_workflow_ids_cannot_traverse_paths_or_reach_a_shell(tmp_path: Path, bad_id: str):
    import yaml

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["teachers"] = {bad_id: {**cfg["teachers"]["resnet20"]}}
    cfg["pairs"][0]["teacher"] = bad_id
    cfg["results_dir"] = str(tmp_path / "results")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", str(path), "--cores", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "does not match" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()
