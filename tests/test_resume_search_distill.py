"""Kill and resume for the search and the distillation (the training job has its own test in
test_training.py): SIGKILL at any point, or SIGTERM (pre-emption, which saves mid-epoch), then a rerun
ends exactly where an uninterrupted run in the same precision ends (CPU, deterministic settings; fp32,
and bf16 autocast with channels-last for SIGTERM)."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    INTERRUPTION_IDS,
    INTERRUPTIONS,
    cli_env,
    run_cli,
    tiny_config,
    write_config,
    write_imagefolder,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("resume")
    images = write_imagefolder(base / "imgs", n_train=120, n_test=12)
    cfg = tiny_config(images.root, base / "results", epochs=3, batch_size=16, schedule="cosine")
    cfg["runtime"].update(deterministic=True, threads=1, log_every=1000)
    teacher_cfg = write_config(base / "teacher.yaml", {**cfg, "model": {"arch": "resnet14"}})
    proc = run_cli("train", "-c", teacher_cfg, "--set", "recipe.epochs=1", "-o", base / "teacher", cwd=base)
    assert proc.returncode == 0, proc.stderr
    cfg["teacher"] = {"arch": "resnet14", "checkpoint": str(base / "teacher" / "best.pt")}
    cfg["search"] = {"epochs": 1, "batch_size": 8, "beta_lr": 0.05}
    cfg["distill"] = {"method": "ofd+kd"}
    bf16 = {**cfg, "runtime": {**cfg["runtime"], "precision": "bf16", "channels_last": True}}
    configs = {"fp32": write_config(base / "cfg.yaml", cfg), "bf16": write_config(base / "bf16.yaml", bf16)}
    return base, configs


def _start(verb: str, cfg: Path, out: Path, cwd: Path) -> subprocess.Popen:
    log = open(cwd / f"{out.name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "dfakd", verb, "-c", str(cfg), "-o", str(out)],
        cwd=cwd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip


def _interrupt_after_first_epoch(proc: subprocess.Popen, state_path: Path, sig: signal.Signals) -> dict:
    deadline = time.monotonic() + 120
    while not (state_path.is_file() and torch.load(state_path, weights_only=True)["epoch"] >= 1):
        assert proc.poll() is None, "the job ended before it could be interrupted"
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.02)
    time.sleep(0.15)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return torch.load(state_path, weights_only=True)


CASES = [
    ("search", "search_checkpoint.pt", "search.json"),
    ("distill", "checkpoint.pt", "result.json"),
]


@pytest.mark.parametrize(("sig", "precision"), INTERRUPTIONS, ids=INTERRUPTION_IDS)
@pytest.mark.parametrize(("verb", "state_name", "result_name"), CASES, ids=[c[0] for c in CASES])
def test_interrupted_job_resumes_to_the_uninterrupted_result(
    setup, verb, state_name, result_name, sig, precision
):
    base, configs = setup
    cfg = configs[precision]
    tag = f"{verb}-{sig.name}-{precision}"
    reference, killed = base / f"{tag}-reference", base / f"{tag}-killed"
    ref_proc = _start(verb, cfg, reference, base)
    proc = _start(verb, cfg, killed, base)
    try:
        state = _interrupt_after_first_epoch(proc, killed / state_name, sig)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (killed / result_name).exists()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL and state["step"] == 0
    else:
        assert proc.returncode == 143, (base / f"{killed.name}.log").read_text()
        assert "stopped: SIGTERM: saved" in (base / f"{killed.name}.log").read_text()

    resumed = run_cli(verb, "-c", cfg, "-o", killed, cwd=base, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert ref_proc.wait(timeout=300) == 0, (base / f"{reference.name}.log").read_text()

    if verb == "search":
        got = json.loads((killed / "search.json").read_text())
        want = json.loads((reference / "search.json").read_text())
        assert got == want  # betas and alphas exactly
        assert (killed / "alpha_trajectory.csv").read_text() == (
            reference / "alpha_trajectory.csv"
        ).read_text()
    else:
        with open(killed / "metrics.csv") as f1, open(reference / "metrics.csv") as f2:
            for a, b in zip(csv.DictReader(f1), csv.DictReader(f2), strict=True):
                for col in set(b) - {"epoch_time_s", "images_per_s"}:
                    assert a[col] == b[col], col
        for name in ("last.pt", "best.pt"):
            ma = torch.load(killed / name, weights_only=True)["model"]
            mb = torch.load(reference / name, weights_only=True)["model"]
            assert all(torch.equal(ma[k], mb[k]) for k in mb), name
    assert json.loads((killed / "settings.json").read_text())["runtime.precision"] == precision
