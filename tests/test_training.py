"""End-to-end jobs through the command line: train, rerun, kill and resume, evaluate, import-teacher."""

from __future__ import annotations

import csv
import hashlib
import json
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import (
    INTERRUPTION_IDS,
    INTERRUPTIONS,
    cli_env,
    one_line_error,
    run_cli,
    tiny_config,
    write_config,
    write_imagefolder,
)

from dfakd import cli, config, models
from dfakd.training.runtime import X86_64

pytestmark = pytest.mark.slow

TIMING = {"epoch_time_s", "images_per_s"}
WALL = {"train_wall_s", "this_run_wall_s"}


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -------------------------------------------------------------------------------------- a trained run


class Trained:
    def __init__(self, base: Path):
        self.base = base
        self.data = write_imagefolder(base / "imgs")
        self.cfg = tiny_config(self.data.root, base / "results", epochs=3)
        self.cfg_path = write_config(base / "cfg.yaml", self.cfg)
        self.run = base / "run"
        self.proc = run_cli("train", "-c", self.cfg_path, "-o", self.run, cwd=base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    t = Trained(tmp_path_factory.mktemp("trained"))
    assert t.proc.returncode == 0, t.proc.stderr
    return t


def test_train_writes_results(trained: Trained):
    run = trained.run
    for name in ("config.yaml", "checkpoint.pt", "best.pt", "last.pt", "metrics.csv", "result.json"):
        assert (run / name).is_file(), name
    assert not list(run.glob(".*.tmp")), "temporary files left behind"
    assert not (run / "mlflow_run.json").exists()  # tracking disabled

    # config.yaml is the fully resolved config, with `auto` runtime settings resolved for the device
    expected = config.load([trained.cfg_path])
    on_x86 = platform.machine().lower() in X86_64  # auto, on CPU
    expected["runtime"].update(precision="fp32", channels_last=on_x86, finite_check_every=1)
    assert yaml.safe_load((run / "config.yaml").read_text()) == expected

    rows = _csv(run / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    metric_cols = {"epoch", "lr", "train_loss", "train_acc1", "test_acc1", "test_acc5", "test_loss"}
    assert set(rows[0]) == metric_cols | TIMING
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.05, 0.005, 0.005])  # milestones [1]

    result = json.loads((run / "result.json").read_text())
    accs = [float(r["test_acc1"]) for r in rows]
    assert result["arch"] == "resnet8" and result["num_classes"] == 3 and result["dataset"] == "imagefolder"
    assert result["epochs"] == 3
    assert result["best_acc1"] == max(accs) and result["best_epoch"] == accs.index(max(accs)) + 1
    assert result["last_acc1"] == accs[-1] and result["last_loss"] == float(rows[-1]["test_loss"])
    assert result["mean_last5_acc1"] == pytest.approx(sum(accs) / 3)

    # the CLI prints a one-line JSON summary
    summary = json.loads(trained.proc.stdout.strip().splitlines()[-1])
    assert summary == {k: result[k] for k in ("arch", "best_acc1", "last_acc1", "best_epoch")}

    best, last, state = _load(run / "best.pt"), _load(run / "last.pt"), _load(run / "checkpoint.pt")
    assert best["arch"] == last["arch"] == "resnet8" and best["num_classes"] == 3
    assert best["epoch"] == result["best_epoch"] and best["accuracy"] == result["best_acc1"]
    assert last["epoch"] == 3 and last["accuracy"] == result["last_acc1"]
    assert state["epoch"] == 3 and len(state["history"]) == 3
    net = models.build("resnet8", 3)
    net.load_state_dict(last["model"], strict=True)
    for key, value in last["model"].items():  # the checkpoint's model is the final one
        assert torch.equal(value, state["trainable"][key]), key


def test_train_again_is_noop(trained: Trained):
    run = trained.run
    stamps = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    again = run_cli("train", "-c", trained.cfg_path, "-o", run, cwd=trained.base)
    assert again.returncode == 0, again.stderr
    assert "already finished" in again.stderr
    assert "epoch 1/" not in again.stderr
    last_line = again.stdout.strip().splitlines()[-1]
    assert json.loads(last_line) == json.loads(trained.proc.stdout.strip().splitlines()[-1])
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == stamps


def test_evaluate_best_matches_result(trained: Trained):
    out = trained.base / "m.json"
    best = trained.run / "best.pt"
    proc = run_cli("evaluate", "--checkpoint", best, "-c", trained.cfg_path, "-o", out, cwd=trained.base)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(out.read_text())
    result = json.loads((trained.run / "result.json").read_text())
    assert {"top1", "top5", "loss"} <= set(metrics)
    assert metrics["top1"] == result["best_acc1"]
    assert metrics["n"] == 12 and metrics["arch"] == "resnet8"
    assert metrics["checkpoint_sha256"] == hashlib.sha256(best.read_bytes()).hexdigest()
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 100 and metrics["loss"] > 0
    best_row = _csv(trained.run / "metrics.csv")[result["best_epoch"] - 1]
    assert metrics["top5"] == float(best_row["test_acc5"])
    assert metrics["loss"] == pytest.approx(float(best_row["test_loss"]), rel=1e-6)
    assert "top-1" in proc.stdout


def test_evaluate_class_count_mismatch(trained: Trained):
    proc = run_cli(
        "evaluate", "--checkpoint", trained.run / "last.pt", "-c", trained.cfg_path,
        "--set", "dataset.num_classes=5", cwd=trained.base,
    )  # fmt: skip
    line = one_line_error(proc, "evaluate")
    assert "3 classes" in line and "5" in line


def test_train_config_error_is_one_line(tmp_path: Path, imagefolder):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(imagefolder.root, tmp_path / "results"))
    proc = run_cli("train", "-c", cfg, "-o", tmp_path / "run", "--set", "recipe.epochs=0", cwd=tmp_path)
    assert "recipe.epochs" in one_line_error(proc, "train")
    proc = run_cli("train", "-c", cfg, "-o", tmp_path / "run", "--set", "model.arch=resnet9", cwd=tmp_path)
    assert "unknown model 'resnet9'" in one_line_error(proc, "train")
    assert not (tmp_path / "run").exists()  # nothing written for a job that cannot start


# ---------------------------------------------------------------------------------- kill and resume


def _start_train(cfg_path: Path, run: Path, cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "dfakd", "train", "-c", str(cfg_path), "-o", str(run)],
            cwd=cwd,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=f,
        )


@pytest.mark.parametrize(("sig", "precision"), INTERRUPTIONS, ids=INTERRUPTION_IDS)
def test_kill_and_resume_equals_uninterrupted_run(tmp_path: Path, sig: signal.Signals, precision: str):
    """SIGKILL loses the epoch in progress; SIGTERM (pre-emption) saves it mid-epoch. Either way the
    resumed run ends exactly where an uninterrupted one in the same precision does."""
    epochs = 4
    images = write_imagefolder(tmp_path / "imgs", n_train=150, n_test=20)
    cfg = tiny_config(images.root, tmp_path / "results", epochs=epochs, schedule="cosine")
    cfg["runtime"].update(deterministic=True, threads=1, log_every=1000)
    if precision == "bf16":
        cfg["runtime"].update(precision="bf16", channels_last=True)
    cfg_path = write_config(tmp_path / "cfg.yaml", cfg)
    killed, reference = tmp_path / "killed", tmp_path / "reference"

    # the uninterrupted reference runs on the second core meanwhile
    ref_proc = _start_train(cfg_path, reference, tmp_path, tmp_path / "reference.log")
    proc = _start_train(cfg_path, killed, tmp_path, tmp_path / "killed.log")
    try:
        state_path = killed / "checkpoint.pt"
        deadline = time.monotonic() + 90
        while True:
            log = (tmp_path / "killed.log").read_text
            assert proc.poll() is None, "training ended before it could be killed:\n" + log()
            assert time.monotonic() < deadline, "no checkpoint after 90 s"
            # written atomically, so whenever it exists it loads
            if state_path.is_file() and _load(state_path)["epoch"] >= 1:
                break
            time.sleep(0.02)
        time.sleep(0.1)  # into the next epoch
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (killed / "result.json").exists() and not (killed / "last.pt").exists()
    state = _load(state_path)
    killed_at = state["epoch"]
    assert 1 <= killed_at < epochs
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert state["step"] == 0
        # Snakemake removes the declared outputs of an incomplete job before rerunning it
        (killed / "best.pt").unlink(missing_ok=True)
    else:
        log_text = (tmp_path / "killed.log").read_text()
        assert proc.returncode == 143, log_text
        assert "stopped: SIGTERM: saved" in log_text and "Traceback" not in log_text
        assert state["step"] > 0 or "after epoch" in log_text  # mid-epoch, unless it landed on a boundary

    resumed = run_cli("train", "-c", cfg_path, "-o", killed, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {state_path} after epoch {killed_at}" in resumed.stderr
    assert f"epoch {killed_at}/{epochs}:" not in resumed.stderr  # finished epochs are not redone
    assert ref_proc.wait(timeout=120) == 0, (tmp_path / "reference.log").read_text()

    got, want = _csv(killed / "metrics.csv"), _csv(reference / "metrics.csv")
    assert len(got) == len(want) == epochs
    for row_got, row_want in zip(got, want, strict=True):
        for col in set(row_want) - TIMING:
            assert row_got[col] == row_want[col], (row_want["epoch"], col)  # exact, as text

    for name in ("last.pt", "best.pt"):
        a, b = _load(killed / name), _load(reference / name)
        assert a["epoch"] == b["epoch"] and a["accuracy"] == b["accuracy"]
        assert a["model"].keys() == b["model"].keys()
        for key in b["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), (name, key)
    sa, sb = _load(killed / "checkpoint.pt"), _load(reference / "checkpoint.pt")
    for key in sb["trainable"]:
        assert torch.equal(sa["trainable"][key], sb["trainable"][key]), key
    for pid, buf in sb["optimizer"]["state"].items():
        assert torch.equal(sa["optimizer"]["state"][pid]["momentum_buffer"], buf["momentum_buffer"])

    ra = json.loads((killed / "result.json").read_text())
    rb = json.loads((reference / "result.json").read_text())
    assert {k: v for k, v in ra.items() if k not in WALL} == {k: v for k, v in rb.items() if k not in WALL}
    assert json.loads((killed / "settings.json").read_text())["runtime.precision"] == precision


# ---------------------------------------------------------------------------------------- import-teacher


class NotAWeight:
    """A custom class: a checkpoint holding one must not be unpickled."""

    def __init__(self):
        self.payload = [1, 2, 3]


def test_import_repdistiller_checkpoint_then_evaluate(trained: Trained, tmp_path: Path):
    weights = _load(trained.run / "best.pt")["model"]
    # RepDistiller's layout: {'epoch', 'model': state_dict, 'accuracy', 'optimizer': state_dict}
    net = models.build("resnet8", 3)
    net.load_state_dict(weights)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()  # momentum buffers exist, like a real training checkpoint
    src = tmp_path / "ckpt_epoch_240.pth"
    state = {"epoch": 240, "model": weights, "accuracy": torch.tensor(73.5), "optimizer": opt.state_dict()}
    torch.save(state, src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    out = tmp_path / "teacher.pt"

    proc = run_cli(
        "import-teacher", src, "--arch", "resnet8", "--num-classes", "3", "--out", out,
        "--sha256", digest.upper(), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "imported resnet8" in proc.stdout
    payload = _load(out)
    assert payload["arch"] == "resnet8" and payload["num_classes"] == 3
    assert payload["imported_from"] == str(src)
    assert payload["model"].keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(payload["model"][key], value), key

    metrics = tmp_path / "m.json"
    proc = run_cli("evaluate", "--checkpoint", out, "-c", trained.cfg_path, "-o", metrics, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((trained.run / "result.json").read_text())
    assert json.loads(metrics.read_text())["top1"] == result["best_acc1"]


def test_import_strips_dataparallel_prefix(tmp_path: Path):
    net = models.build("resnet8", 3)
    src = tmp_path / "dp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, src)
    argv = [
        "import-teacher",
        str(src),
        "--arch",
        "resnet8",
        "--num-classes",
        "3",
        "--out",
        str(tmp_path / "o.pt"),
    ]
    assert cli.main(argv) == 0
    assert _load(tmp_path / "o.pt")["model"].keys() == net.state_dict().keys()


def _import(tmp_path: Path, src: Path, arch: str = "resnet8", classes: int = 3, *extra: str):
    args = ["--arch", arch, "--num-classes", str(classes), "--out", str(tmp_path / "t.pt"), *extra]
    return run_cli("import-teacher", src, *args, cwd=tmp_path)


def test_import_wrong_architecture_lists_keys(tmp_path: Path):
    src = tmp_path / "vgg.pth"
    torch.save({"model": models.build("vgg8", 3).state_dict()}, src)
    line = one_line_error(_import(tmp_path, src), "import-teacher")
    assert "does not fit architecture 'resnet8'" in line
    assert "missing keys: bn1.bias, " in line and "conv1.weight" in line  # sorted, first 8 shown
    assert "unexpected keys: " in line and "block0.0.weight" in line
    assert not (tmp_path / "t.pt").exists()


def test_import_wrong_class_count_lists_shapes(tmp_path: Path):
    src = tmp_path / "r100.pth"
    torch.save({"model": models.build("resnet8", 100).state_dict()}, src)
    line = one_line_error(_import(tmp_path, src), "import-teacher")
    assert "shape mismatch keys: fc.bias, fc.weight" in line and "missing" not in line


def test_import_refuses_pickled_objects(tmp_path: Path):
    src = tmp_path / "evil.pth"
    torch.save({"model": models.build("resnet8", 3).state_dict(), "extra": NotAWeight()}, src)
    line = one_line_error(_import(tmp_path, src), "import-teacher")
    assert "pickled Python objects" in line and str(src) in line


def test_import_truncated_file(trained: Trained, tmp_path: Path):
    raw = (trained.run / "best.pt").read_bytes()
    src = tmp_path / "half.pth"
    src.write_bytes(raw[: len(raw) // 2])
    line = one_line_error(_import(tmp_path, src), "import-teacher")
    assert "truncated or corrupt" in line and str(src) in line


def test_import_wrong_sha256_and_missing_file(trained: Trained, tmp_path: Path):
    src = trained.run / "best.pt"
    line = one_line_error(_import(tmp_path, src, "resnet8", 3, "--sha256", "0" * 64), "import-teacher")
    assert "sha256" in line and hashlib.sha256(src.read_bytes()).hexdigest() in line
    assert not (tmp_path / "t.pt").exists()
    line = one_line_error(_import(tmp_path, tmp_path / "absent.pth"), "import-teacher")
    assert "checkpoint not found" in line


def test_import_non_state_dict(tmp_path: Path):
    src = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], src)
    assert "holds no state_dict" in one_line_error(_import(tmp_path, src), "import-teacher")


# ------------------------------------------------------------------------------------------------ help

VERBS = [
    "prepare-data", "train", "evaluate", "import-teacher", "search", "derive", "distill", "summarize", "plot",
    "tracking-init", "tracking-finish", "sync-mlflow", "relocate-mlflow", "models",
]  # fmt: skip


def test_the_verbs_are_exactly_these():
    sub = next(a for a in cli.build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert sorted(sub.choices) == sorted(VERBS)


def test_top_level_help_lists_verbs(tmp_path: Path):
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for verb in VERBS:
        assert verb in proc.stdout


@pytest.mark.parametrize("verb", VERBS)
def test_verb_help_exits_zero(verb: str, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([verb, "--help"])
    assert exit_info.value.code == 0
    assert f"dfakd {verb}" in capsys.readouterr().out


def test_models_verb_lists_zoo(capsys: pytest.CaptureFixture[str]):
    assert cli.main(["models"]) == 0
    names = capsys.readouterr().out.split()
    assert names == models.available() and "resnet8" in names
