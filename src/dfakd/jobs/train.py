"""``dfakd train``: a model alone with cross-entropy (teachers and the vanilla student baseline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dfakd import data, models
from dfakd.jobs.common import (
    check_batch_size,
    check_run_dir,
    finish_job,
    open_job,
    stage_settings,
    test_stream,
    train_stream,
)
from dfakd.training.loop import run_epochs
from dfakd.training.runtime import log, prepare_module, setup
from dfakd.training.supervised import SupervisedTask

CHECKPOINT, RESULT = "checkpoint.pt", "result.json"


def train(cfg: dict[str, Any], run_dir: str | Path, retrain: bool = False) -> dict[str, Any]:
    arch = cfg["model"]["arch"]
    device = setup(cfg)
    run = check_run_dir(run_dir, CHECKPOINT, RESULT, stage_settings(cfg, "train"), retrain)
    if run.done is not None:
        return run.done
    n_classes = data.num_classes(cfg["dataset"])
    torch.manual_seed(cfg["seed"])
    model = prepare_module(models.build(arch, n_classes), device, cfg["runtime"]["channels_last"])
    train_split = data.load_split(cfg["dataset"], "train")
    batch_size = cfg["recipe"]["batch_size"]
    check_batch_size("recipe.batch_size", batch_size, len(train_split), "the training split")
    train_batches, test_batches = train_stream(cfg, device, train_split, batch_size), test_stream(cfg, device)
    meta = {"arch": arch, "num_classes": n_classes, "dataset": cfg["dataset"]["name"], "seed": cfg["seed"]}

    def step_loss(x, y, epoch):
        logits = model(x)
        return F.cross_entropy(logits, y), logits, {}

    task = SupervisedTask(cfg, model, model, step_loss, train_batches, test_batches, device)
    name = f"train-{cfg['dataset']['name']}-{arch}-s{cfg['seed']}"
    job = open_job(cfg, run, device, "train", name, {"model": arch})
    try:
        log(f"training {arch} on {cfg['dataset']['name']} ({len(train_batches)} steps/epoch) on {device}")
        history, final_state = run_epochs(run, task, job.tracker, cfg["runtime"], "metrics.csv")
        result = task.finish(run.path, history, meta)
        finish_job(job, result, final_state)
    except BaseException as exc:
        job.tracker.abort(exc)
        raise
    return result
