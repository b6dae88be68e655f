"""``dfakd train``: a model alone with cross-entropy (teachers and the vanilla student baseline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dfakd import data, models
from dfakd.jobs.common import check_run_dir, open_job, run_supervised, stage_settings, supervised_streams
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
    _, train_batches, test_batches = supervised_streams(cfg, device)
    meta = {"arch": arch, "num_classes": n_classes, "dataset": cfg["dataset"]["name"], "seed": cfg["seed"]}

    def step_loss(x, y, epoch):
        logits = model(x)
        return F.cross_entropy(logits, y), logits, {}

    task = SupervisedTask(cfg, model, model, step_loss, train_batches, test_batches, device)
    name = f"train-{cfg['dataset']['name']}-{arch}-s{cfg['seed']}"
    job = open_job(cfg, run, device, "train", name, {"model": arch})
    log(f"training {arch} on {cfg['dataset']['name']} ({len(train_batches)} steps/epoch) on {device}")
    return run_supervised(job, task, meta)
