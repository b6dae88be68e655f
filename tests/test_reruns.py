"""Reruns tell the truth: a job resumes only an unfinished checkpoint of the same settings.

Driven through the CLI, as a user (or a Snakemake rule) runs it. What a rerun does is checked on what it
trained (the first epoch's logged lr or loss, the settings in the checkpoint), not on what it planned.
"""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_env, one_line_error, run_cli, tiny_config, write_config, write_imagefolder


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory):
    return write_imagefolder(tmp_path_factory.mktemp("rerun_data") / "imgs", n_train=24, n_test=6)


def _train(tmp_path: Path, images, run: Path, *args: str, epochs: int = 2) -> subprocess.CompletedProcess:
    """``dfakd train``; ``key=value`` arguments become ``--set key=value``, others pass as they are."""
    cfg = tiny_config(images.root, tmp_path / "results", epochs=epochs)
    path = write_config(tmp_path / "cfg.yaml", cfg)
    argv = [a for arg in args for a in (("--set", arg) if "=" in arg else (arg,))]
    return run_cli("train", "-c", path, "-o", run, *argv, cwd=tmp_path)


def test_changed_setting_on_a_finished_run_is_refused_then_retrained(tmp_path: Path, images) -> None:
    run = tmp_path / "run"
    first = _train(tmp_path, images, run)
    assert first.returncode == 0, first.stderr
    before = _snapshot(run)

    same = _train(tmp_path, images, run)
    assert same.returncode == 0 and "already finished with these settings" in same.stderr
    assert _snapshot(run) == before

    for change, key in (
        ("recipe.lr=0.1", "recipe.lr 0.05 -> 0.1"),
        ("recipe.epochs=3", "recipe.epochs 2 -> 3"),
    ):
        refused = _train(tmp_path, images, run, change)
        line = one_line_error(refused, "train")
        assert "holds a finished run with other settings" in line and key in line and "--retrain" in line
        assert _snapshot(run) == before  # not even config.yaml was rewritten

    retrained = _train(tmp_path, images, run, "recipe.lr=0.1", "--retrain")
    assert retrained.returncode == 0, retrained.stderr
    assert "epoch 1/2" in retrained.stderr and "set aside" in retrained.stderr
    assert float(_rows(run / "metrics.csv")[0]["lr"]) == 0.1  # it trained with the new value
    (old,) = (run / "superseded").iterdir()
    assert float(_rows(old / "metrics.csv")[0]["lr"]) == 0.05
    assert {"result.json", "checkpoint.pt", "best.pt", "last.pt", "config.yaml"} <= {
        p.name for p in old.iterdir()
    }
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["finished"] and state["settings"]["recipe.lr"] == 0.1


def test_finished_checkpoint_whose_outputs_are_gone_trains_afresh(tmp_path: Path, images) -> None:
    """What a Snakemake rerun (or --forcerun) leaves: it deletes the outputs, the checkpoint stays."""
    run = tmp_path / "run"
    assert _train(tmp_path, images, run).returncode == 0
    first = json.loads((run / "result.json").read_text())
    for name in ("result.json", "best.pt", "last.pt"):
        (run / name).unlink()
    again = _train(tmp_path, images, run)
    assert again.returncode == 0, again.stderr
    assert "finished run whose outputs are gone" in again.stderr
    assert "epoch 1/2" in again.stderr and "resuming" not in again.stderr
    assert json.loads((run / "result.json").read_text())["fingerprint"] == first["fingerprint"]


def _interrupt(run: Path) -> None:
    """Make the finished checkpoint look like one of a run killed after its last epoch's checkpoint."""
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save({**state, "finished": False}, run / "checkpoint.pt")
    for name in ("result.json", "best.pt", "last.pt"):
        (run / name).unlink()


def test_interrupted_checkpoint_resumes_only_with_the_same_settings(tmp_path: Path, images) -> None:
    run = tmp_path / "run"
    assert _train(tmp_path, images, run).returncode == 0
    _interrupt(run)
    resumed = _train(tmp_path, images, run)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "after epoch 2 of 2 epochs" in resumed.stderr
    assert "epoch 1/2" not in resumed.stderr and (run / "result.json").is_file()

    _interrupt(run)
    changed = _train(tmp_path, images, run, "recipe.lr=0.2")
    assert changed.returncode == 0, changed.stderr
    assert "settings changed since" in changed.stderr and "recipe.lr 0.05 -> 0.2" in changed.stderr
    assert "resuming" not in changed.stderr
    assert float(_rows(run / "metrics.csv")[0]["lr"]) == 0.2


@pytest.fixture(scope="module")
def teacher(images, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("rerun_teacher")
    proc = _train(base, images, base / "teacher", epochs=1)
    assert proc.returncode == 0, proc.stderr
    return base / "teacher" / "best.pt"


def _distill(tmp_path: Path, images, teacher: Path, run: Path, *extra: str) -> subprocess.CompletedProcess:
    cfg = tiny_config(images.root, tmp_path / "results", epochs=1)
    cfg["teacher"] = {"checkpoint": str(teacher)}
    path = write_config(tmp_path / "distill.yaml", cfg)
    return run_cli("distill", "-c", path, "--method", "kd", "-o", run, *extra, cwd=tmp_path)


def test_a_method_option_decides_the_settings(tmp_path: Path, images, teacher: Path) -> None:
    run = tmp_path / "kd"
    assert _distill(tmp_path, images, teacher, run).returncode == 0
    first_kd = float(_rows(run / "metrics.csv")[0]["train_kd"])
    # the default, spelled out, is the same setting: nothing to do
    same = _distill(tmp_path, images, teacher, run, "--set", "distill.options={kd: {weight: 0.9}}")
    assert same.returncode == 0 and "nothing to do" in same.stderr

    half = ("--set", "distill.options={kd: {weight: 0.45}}")
    line = one_line_error(_distill(tmp_path, images, teacher, run, *half), "distill")
    assert "distill.options.kd.weight 0.9 -> 0.45" in line
    retrained = _distill(tmp_path, images, teacher, run, *half, "--retrain")
    assert retrained.returncode == 0, retrained.stderr
    # same init, data and teacher: the first epoch's KD term is about half the old one
    assert float(_rows(run / "metrics.csv")[0]["train_kd"]) == pytest.approx(first_kd / 2, rel=0.2)


def test_a_new_teacher_is_a_new_setting(tmp_path: Path, images, teacher: Path) -> None:
    run = tmp_path / "kd"
    assert _distill(tmp_path, images, teacher, run).returncode == 0
    other = tmp_path / "other_teacher.pt"
    payload = torch.load(teacher, weights_only=True)
    payload["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in payload["model"].items()}
    torch.save(payload, other)
    line = one_line_error(_distill(tmp_path, images, other, run), "distill")
    assert "teacher.sha256" in line


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_follow_the_umask(tmp_path: Path, images, umask: int) -> None:
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(images.root, tmp_path / "results", epochs=1))
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "dfakd", "train", "-c", str(cfg), "-o", str(run)],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.umask(umask),
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("checkpoint.pt", "best.pt", "last.pt", "result.json", "config.yaml", "metrics.csv"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o666 & ~umask, name


def test_an_empty_result_file_is_one_line_and_retrain_sets_it_aside(tmp_path: Path, images) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "result.json").write_text("")
    line = one_line_error(_train(tmp_path, images, run), "train")
    assert "result.json is not valid JSON" in line and "--retrain" in line
    assert [p.name for p in run.iterdir()] == ["result.json"]  # nothing written
    retrained = _train(tmp_path, images, run, "--retrain")
    assert retrained.returncode == 0, retrained.stderr
    (old,) = (run / "superseded").iterdir()
    assert (old / "result.json").read_text() == ""


def test_a_key_added_later_keeps_earlier_results_valid_at_its_neutral_value(tmp_path: Path, images) -> None:
    """`search.warmup_epochs` came after searches had been run: at 0 (what they computed) it stays out of
    the settings, so their fingerprints still match; at any other value it is a setting like any other."""
    from dfakd import config
    from dfakd.jobs.common import ADDED_NEUTRAL, stage_settings

    cfg = config.load([write_config(tmp_path / "cfg.yaml", tiny_config(images.root, tmp_path / "results"))])
    assert cfg["search"]["warmup_epochs"] == ADDED_NEUTRAL["search.warmup_epochs"] == 0
    neutral = stage_settings(cfg, "search")
    assert "search.warmup_epochs" not in neutral and "search.epochs" in neutral
    cfg["search"]["warmup_epochs"] = 2
    assert stage_settings(cfg, "search") == {**neutral, "search.warmup_epochs": 2}
