"""Job entry points behind the CLI verbs ``train``, ``evaluate`` and ``import-teacher``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dfakd import config as config_mod
from dfakd import data, models
from dfakd.errors import DfakdError
from dfakd.tracking import Tracker
from dfakd.training import checkpoint as ckpt
from dfakd.training.loop import RESULT, Job, evaluate, finish, fit
from dfakd.training.runtime import log, prepare_module, setup


def open_job(
    cfg: dict[str, Any],
    run_dir: str | Path,
    device: torch.device,
    stage: str,
    run_name: str,
    tags: dict[str, Any],
    meta: dict[str, Any] | None = None,
) -> Job:
    """Write ``config.yaml`` and open (or reopen) the job's MLflow run. Called once every input has been
    checked, so that a bad input leaves nothing behind in the results folder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(run_dir / "config.yaml", config_mod.dump(cfg))
    base_tags = {"stage": stage, "dataset": cfg["dataset"]["name"], "seed": str(cfg["seed"])}
    tracker = Tracker(cfg, run_dir, run_name, {**base_tags, **{k: str(v) for k, v in tags.items()}})
    return Job(cfg=cfg, run_dir=run_dir, device=device, tracker=tracker, meta=meta or {})


def train_stream(
    cfg: dict[str, Any], device: torch.device, split: data.ImageSplit | None = None
) -> data.BatchStream:
    """Shuffled, augmented batches of the training split (or of ``split``, a part of it)."""
    dcfg = cfg["dataset"]
    mean, std = data.normalization(dcfg)
    return data.BatchStream(
        split if split is not None else data.load_split(dcfg, "train"),
        cfg["recipe"]["batch_size"],
        device,
        mean,
        std,
        train=True,
        augment=data.train_augment(dcfg),
        pad_mode=dcfg["pad_mode"],
        seed=cfg["seed"],
        channels_last=cfg["runtime"]["channels_last"],
    )


def test_stream(cfg: dict[str, Any], device: torch.device) -> data.BatchStream:
    """Batches of the test split, in order, unaugmented."""
    dcfg = cfg["dataset"]
    mean, std = data.normalization(dcfg)
    return data.BatchStream(
        data.load_split(dcfg, "test"),
        cfg["runtime"]["eval_batch_size"],
        device,
        mean,
        std,
        train=False,
        channels_last=cfg["runtime"]["channels_last"],
    )


def already_done(run_dir: Path, result_name: str = RESULT) -> dict[str, Any] | None:
    """The result of a job that finished (its result file exists), else None: rerunning is a no-op."""
    path = run_dir / result_name
    if not path.is_file():
        return None
    log(f"{run_dir} already finished ({result_name} present); nothing to do")
    return json.loads(path.read_text())


def train(cfg: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """``dfakd train``: a model alone with cross-entropy (teachers and the vanilla student baseline)."""
    run_dir = Path(run_dir)
    done = already_done(run_dir)
    if done is not None:
        return done
    arch = cfg["model"]["arch"]
    device = setup(cfg)
    n_classes = data.num_classes(cfg["dataset"])
    train_batches, test_batches = train_stream(cfg, device), test_stream(cfg, device)
    torch.manual_seed(cfg["seed"])
    model = prepare_module(models.build(arch, n_classes), device, cfg["runtime"]["channels_last"])
    meta = {"arch": arch, "num_classes": n_classes, "dataset": cfg["dataset"]["name"], "seed": cfg["seed"]}

    def step_loss(x, y, epoch):
        logits = model(x)
        return F.cross_entropy(logits, y), logits, {}

    job = open_job(cfg, run_dir, device, "train", f"train-{arch}-s{cfg['seed']}", {"model": arch}, meta)
    try:
        log(f"training {arch} on {cfg['dataset']['name']} ({len(train_batches)} steps/epoch) on {job.device}")
        result = fit(job, model, model, step_loss, train_batches, test_batches)
        finish(job, result)
    except BaseException as exc:
        job.tracker.abort(exc)
        raise
    return result


def load_model(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[models.FeatureNet, dict[str, Any]]:
    """A model saved by this package (``{'model': sd, 'arch': ..., 'num_classes': ...}``)."""
    payload = ckpt.load(path)
    if not isinstance(payload, dict) or "arch" not in payload or "num_classes" not in payload:
        raise DfakdError(
            f"{path} lacks 'arch'/'num_classes' metadata; bring community checkpoints in with "
            "`dfakd import-teacher CKPT --arch NAME --num-classes N --out PATH`"
        )
    model = models.build(payload["arch"], int(payload["num_classes"]))
    ckpt.load_state_strict(model, ckpt.extract_state_dict(payload, path), str(path), payload["arch"])
    meta = {k: v for k, v in payload.items() if k != "model"}
    return model.to(device), meta


def evaluate_checkpoint(
    cfg: dict[str, Any], checkpoint: str | Path, out: str | Path | None
) -> dict[str, Any]:
    """``dfakd evaluate``: top-1/top-5/loss of a saved model on the configured test split, as JSON."""
    device = setup(cfg)
    model, meta = load_model(checkpoint, device)
    n_classes = data.num_classes(cfg["dataset"])
    if meta["num_classes"] != n_classes:
        raise DfakdError(
            f"{checkpoint} has {meta['num_classes']} classes, dataset {cfg['dataset']['name']} {n_classes}"
        )
    model = prepare_module(model, device, cfg["runtime"]["channels_last"])
    metrics = evaluate(model, test_stream(cfg, device), cfg["runtime"]["precision"])
    result = {
        "checkpoint": str(checkpoint),
        "arch": meta["arch"],
        "dataset": cfg["dataset"]["name"],
        **metrics,
    }
    if out is not None:
        ckpt.atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    return result


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_teacher(
    source: str | Path, arch: str, num_classes: int, out: str | Path, sha256: str | None = None
) -> dict[str, Any]:
    """``dfakd import-teacher``: a community checkpoint (``{'model': sd}``) -> our layout, strictly."""
    source = Path(source)
    if not source.is_file():
        raise DfakdError(f"checkpoint not found: {source}")
    if sha256 is not None:
        actual = sha256_of(source)
        if actual != sha256.lower():
            raise DfakdError(f"sha256 of {source} is {actual}, expected {sha256}")
    model = models.build(arch, num_classes)
    state = ckpt.extract_state_dict(ckpt.load(source), source)
    ckpt.load_state_strict(model, state, str(source), arch)
    payload = {
        "model": model.state_dict(),
        "arch": arch,
        "num_classes": num_classes,
        "imported_from": str(source),
    }
    ckpt.atomic_save(payload, out)
    return {
        "arch": arch,
        "num_classes": num_classes,
        "out": str(out),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def load_teacher(cfg: dict[str, Any], n_classes: int) -> tuple[models.FeatureNet, str]:
    """The frozen teacher of ``search``/``distill`` from ``teacher.checkpoint`` (our layout)."""
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
    return teacher, arch
