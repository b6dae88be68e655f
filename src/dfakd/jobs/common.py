"""What every job shares: its settings and run folder, its data streams, its teacher, its MLflow run."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dfakd import config as config_mod
from dfakd import data, models
from dfakd.errors import DfakdError
from dfakd.files import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    load_checkpoint,
)
from dfakd.models.state import extract_state_dict, load_state_strict
from dfakd.tracking import Tracker
from dfakd.training.loop import RunFolder, open_run, run_epochs
from dfakd.training.runtime import bf16_hint, log, prepare_module
from dfakd.training.supervised import SupervisedTask

#: the config sections that decide each stage's result (its settings: fingerprinted, logged as params)
STAGE_SECTIONS = {
    "train": ("seed", "dataset", "model", "recipe", "runtime"),
    "search": ("seed", "dataset", "model", "teacher", "search", "derive", "runtime"),
    "distill": ("seed", "dataset", "model", "teacher", "distill", "recipe", "runtime"),
}
#: keys inside those sections that stay out of the settings: the run-only ones, and those whose content
#: enters the settings in another form (the teacher's and the aggregation's digests, the resolved options)
OPERATIONAL = {*config_mod.RUN_ONLY_KEYS, "teacher.checkpoint", "distill.aggregation", "distill.options"}
#: keys added after results were first written, at the value that computes what those results computed
#: without the key: at that value they stay out of the settings, so the earlier results stay valid
ADDED_NEUTRAL = {"search.warmup_epochs": 0}


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stage_settings(cfg: dict[str, Any], stage: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The flat settings that decide a ``stage`` job's result: its sections of the resolved config without
    operational keys (nor keys of ``ADDED_NEUTRAL`` at their neutral value), plus ``extra`` (content
    digests of input files instead of their paths, resolved method options)."""
    flat = config_mod.flatten({key: cfg[key] for key in STAGE_SECTIONS[stage]})
    settings = {
        k: v
        for k, v in flat.items()
        if not config_mod.is_under(k, OPERATIONAL) and not (k in ADDED_NEUTRAL and v == ADDED_NEUTRAL[k])
    }
    return {**settings, **(extra or {})}


@dataclass
class Job:
    """An opened job: its config, run folder, device and MLflow run."""

    cfg: dict[str, Any]
    run: RunFolder
    device: torch.device
    tracker: Tracker

    @property
    def run_dir(self) -> Path:
        return self.run.path


def check_run_dir(
    run_dir: str | Path, checkpoint_name: str, result_name: str, settings, retrain
) -> RunFolder:
    """The run folder must be a writable folder; decide (without writing) whether to skip, resume or start."""
    return open_run(check_output_dir(run_dir), checkpoint_name, result_name, settings, retrain)


def open_job(
    cfg: dict[str, Any],
    run: RunFolder,
    device: torch.device,
    stage: str,
    run_name: str,
    tags: dict[str, Any],
    inputs: dict[str, str | Path] | None = None,
) -> Job:
    """Set an earlier run's files aside, write ``config.yaml``, ``settings.json`` (what decides the result:
    the settings the checkpoint stores, the MLflow run's params) and a copy of each of ``inputs`` (name in
    the run folder -> file, e.g. the aggregation file a DFA student uses), and open (or reopen) the MLflow
    run. Called once every input has been checked, so that a bad input leaves nothing behind."""
    run.path.mkdir(parents=True, exist_ok=True)
    set_aside = run.begin()
    hint = bf16_hint(cfg["runtime"], device)
    if hint:
        log(hint)
    atomic_write_text(run.path / "config.yaml", config_mod.dump(cfg))
    atomic_write_json(run.path / "settings.json", json.loads(json.dumps(run.settings, default=str)))
    for name, source in (inputs or {}).items():
        atomic_write_bytes(run.path / name, Path(source).read_bytes())
    base_tags = {"stage": stage, "dataset": cfg["dataset"]["name"], "seed": str(cfg["seed"])}
    tracker = Tracker(cfg, run.path, run_name, {**base_tags, **{k: str(v) for k, v in tags.items()}})
    if set_aside is not None:
        tracker.mark_superseded(set_aside)
    return Job(cfg=cfg, run=run, device=device, tracker=tracker)


def finish_job(job: Job, result: dict[str, Any], final_state: dict[str, Any]) -> None:
    """Write the result file (last but for the checkpoint's finished mark), then let the tracker send what
    the MLflow run still lacks and close it."""
    job.run.finish(result, final_state)
    job.tracker.finish()
    log(f"done; {job.tracker.describe()}")


def train_stream(
    cfg: dict[str, Any], device: torch.device, split: data.ImageSplit, batch_size: int, stream_id: int = 0
) -> data.BatchStream:
    """Shuffled, augmented batches of a training split (or of a part of it)."""
    dcfg = cfg["dataset"]
    mean, std = data.normalization(dcfg)
    return data.BatchStream(
        split,
        batch_size,
        device,
        mean,
        std,
        train=True,
        augment=data.train_augment(dcfg),
        pad_mode=dcfg["pad_mode"],
        seed=cfg["seed"],
        stream_id=stream_id,
        channels_last=cfg["runtime"]["channels_last"],
    )


def eval_stream(cfg: dict[str, Any], device: torch.device, split: data.ImageSplit) -> data.BatchStream:
    """Batches of a split, in order, unaugmented."""
    mean, std = data.normalization(cfg["dataset"])
    return data.BatchStream(
        split,
        cfg["runtime"]["eval_batch_size"],
        device,
        mean,
        std,
        train=False,
        channels_last=cfg["runtime"]["channels_last"],
    )


def test_stream(cfg: dict[str, Any], device: torch.device) -> data.BatchStream:
    """Batches of the test split, in order, unaugmented."""
    return eval_stream(cfg, device, data.load_split(cfg["dataset"], "test"))


def supervised_streams(
    cfg: dict[str, Any], device: torch.device
) -> tuple[data.ImageSplit, data.BatchStream, data.BatchStream]:
    """The training split (checked against ``recipe.batch_size``), its training stream and the test
    stream of ``train`` and ``distill``."""
    train_split = data.load_split(cfg["dataset"], "train")
    batch_size = cfg["recipe"]["batch_size"]
    check_batch_size("recipe.batch_size", batch_size, len(train_split), "the training split")
    return train_split, train_stream(cfg, device, train_split, batch_size), test_stream(cfg, device)


def run_supervised(job: Job, task: SupervisedTask, meta: dict[str, Any], before=None) -> dict[str, Any]:
    """Run a supervised task to its end in the job's run folder (``before``: called first, inside the
    job); the job's MLflow run is closed as FAILED/KILLED if it stops early."""
    try:
        if before is not None:
            before()
        history, final_state = run_epochs(job.run, task, job.tracker, job.cfg["runtime"], "metrics.csv")
        result = task.finish(job.run_dir, history, meta)
        finish_job(job, result, final_state)
    except BaseException as exc:
        job.tracker.abort(exc)
        raise
    return result


def check_batch_size(key: str, batch_size: int, n: int, what: str) -> None:
    if batch_size > n:
        raise DfakdError(f"config key '{key}' is {batch_size}, larger than {what} ({n} images)")


def load_model(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[models.FeatureNet, dict[str, Any]]:
    """A model saved by this package (``{'model': sd, 'arch': ..., 'num_classes': ...}``)."""
    payload = load_checkpoint(path)
    if not isinstance(payload, dict) or "arch" not in payload or "num_classes" not in payload:
        raise DfakdError(
            f"{path} lacks 'arch'/'num_classes' metadata; bring community checkpoints in with "
            "`dfakd import-teacher CKPT --arch NAME --num-classes N --out PATH`"
        )
    arch, n_classes = payload["arch"], payload["num_classes"]
    if not isinstance(arch, str) or not models.is_available(arch):
        raise DfakdError(f"checkpoint {path}: 'arch' is {arch!r}, not a model of the zoo (`dfakd models`)")
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
        raise DfakdError(f"checkpoint {path}: 'num_classes' is {n_classes!r}, not a positive integer")
    model = models.build(arch, n_classes)
    load_state_strict(model, extract_state_dict(payload, path), str(path), arch)
    meta = {k: v for k, v in payload.items() if k != "model"}
    return model.to(device), meta


def load_teacher(cfg: dict[str, Any], n_classes: int) -> tuple[models.FeatureNet, str, str]:
    """The teacher of ``search``/``distill`` from ``teacher.checkpoint`` (our layout): model, zoo name and
    the file's sha256 (a job's settings name the teacher's content, not its path)."""
    path = cfg["teacher"]["checkpoint"]
    if not path:
        raise DfakdError(
            "config key 'teacher.checkpoint' is not set (a `dfakd train` best.pt or an imported teacher)"
        )
    teacher, meta = load_model(path)
    arch = meta["arch"]
    if cfg["teacher"]["arch"] and cfg["teacher"]["arch"] != arch:
        raise DfakdError(f"teacher.arch is {cfg['teacher']['arch']!r} but {path} holds a {arch!r}")
    if meta["num_classes"] != n_classes:
        raise DfakdError(f"teacher {path} has {meta['num_classes']} classes, the dataset {n_classes}")
    return teacher, arch, sha256_of(path)


def frozen(teacher: models.FeatureNet, device: torch.device, channels_last: bool) -> models.FeatureNet:
    """The teacher on the device, in eval mode, without gradients."""
    teacher = prepare_module(teacher, device, channels_last).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
