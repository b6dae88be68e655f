"""``dfakd distill``: stage 2, a student trained with cross-entropy plus the configured methods' losses, in
the training loop of ``dfakd train``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dfakd import data, methods, models
from dfakd.jobs.common import (
    check_run_dir,
    eval_stream,
    frozen,
    load_teacher,
    open_job,
    run_supervised,
    stage_settings,
    supervised_streams,
)
from dfakd.methods.distill import DistillStep
from dfakd.training.runtime import log, prepare_module, setup
from dfakd.training.supervised import SupervisedTask

CHECKPOINT, RESULT = "checkpoint.pt", "result.json"


def build_step(
    cfg: dict[str, Any], device: torch.device, n_classes: int
) -> tuple[DistillStep, str, str | None]:
    """The job's step as ``distill`` builds it before training: the student (seeded), the frozen teacher
    and the methods' parts (not yet prepared), with the teacher's zoo name and content hash (None without a
    teacher). Not yet moved to the device as a whole (``prepare_module``)."""
    dcfg = cfg["distill"]
    names = methods.parse_method(dcfg["method"])
    teacher, teacher_arch, teacher_sha = None, cfg["teacher"]["arch"] or "-", None
    if names:
        teacher, teacher_arch, teacher_sha = load_teacher(cfg, n_classes)
    torch.manual_seed(cfg["seed"])
    student = models.build(cfg["model"]["arch"], n_classes)
    parts = []
    if names:
        teacher = frozen(teacher, device, cfg["runtime"]["channels_last"])
        context = methods.DistillContext(teacher_arch, dcfg["aggregation"])
        parts = methods.build(names, teacher, student.to(device), dcfg["options"], context)
    return DistillStep(student, teacher, parts, dcfg["ce_weight"]), teacher_arch, teacher_sha


def distill(cfg: dict[str, Any], run_dir: str | Path, retrain: bool = False) -> dict[str, Any]:
    dcfg = cfg["distill"]
    names = methods.parse_method(dcfg["method"])
    student_arch, method_type = cfg["model"]["arch"], dcfg["method"]
    # the config's name of the method (the workflow's `methods:` key, e.g. dfa_average), else its type
    method_tag = str(cfg["tracking"]["tags"].get("method") or method_type)
    device = setup(cfg)
    n_classes = data.num_classes(cfg["dataset"])
    step, teacher_arch, teacher_sha = build_step(cfg, device, n_classes)
    parts, teacher = list(step.parts), step.teacher[0]
    extra = {"teacher.sha256": teacher_sha, **{k: v for part in parts for k, v in part.settings().items()}}
    run = check_run_dir(run_dir, CHECKPOINT, RESULT, stage_settings(cfg, "distill", extra), retrain)
    if run.done is not None:
        return run.done
    train_split, train_batches, test_batches = supervised_streams(cfg, device)
    step = prepare_module(step, device, cfg["runtime"]["channels_last"])
    task = SupervisedTask(cfg, step, step.student, step.loss, train_batches, test_batches, device)
    pair = f"{teacher_arch}-{student_arch}"
    tags = {
        "method": method_tag, "method_type": method_type, "teacher": teacher_arch, "student": student_arch,
        "pair": pair,
    }  # fmt: skip
    meta = {
        "arch": student_arch,
        "num_classes": n_classes,
        "dataset": cfg["dataset"]["name"],
        "seed": cfg["seed"],
        "teacher": teacher_arch,
        "method": method_type,
    }
    name = f"{method_tag}-{cfg['dataset']['name']}-{pair}-s{cfg['seed']}"
    inputs = {"aggregation.yaml": dcfg["aggregation"]} if "dfa" in names and dcfg["aggregation"] else {}
    job = open_job(cfg, run, device, "distill", name, {**tags, "model": student_arch}, inputs)

    def prepare_methods() -> None:  # fixed state (margins) from the training data, not on resume
        if parts and run.resume_state is None:
            unaugmented = eval_stream(cfg, device, train_split)
            for part in step.parts:
                part.prepare(teacher, unaugmented)

    log(f"distilling {teacher_arch} -> {student_arch} with {method_tag} ({method_type}) on {device}")
    return run_supervised(job, task, meta, before=prepare_methods)
