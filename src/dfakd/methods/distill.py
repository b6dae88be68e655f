"""Stage 2: ``dfakd distill`` trains a student with cross-entropy plus the configured methods' losses.

One teacher forward per step feeds every method (``forward_features`` collects all candidates and the
logits at once); the training loop, checkpoints and resume are those of ``dfakd train``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfakd import data, methods, models
from dfakd.training.jobs import already_done, load_teacher, open_job, test_stream, train_stream
from dfakd.training.loop import CHECKPOINT, finish, fit
from dfakd.training.runtime import log, prepare_module, setup


class DistillStep(nn.Module):
    """The student and the methods' trainable parts (one module, so one optimizer and one checkpoint)."""

    def __init__(self, student: models.FeatureNet, teacher: models.FeatureNet, parts: list, ce_weight: float):
        super().__init__()
        self.student = student
        self.parts = nn.ModuleList(parts)
        self.ce_weight = ce_weight
        self.teacher = [teacher]  # a list: not a submodule, so not trained nor saved

    def loss(self, x: torch.Tensor, y: torch.Tensor, epoch: float):
        terms: dict[str, torch.Tensor] = {}
        s = self.student.forward_features(x)
        terms["ce"] = self.ce_weight * F.cross_entropy(s.logits.float(), y)
        if len(self.parts):
            with torch.no_grad():
                t = self.teacher[0].forward_features(x)
            for part in self.parts:
                terms.update(part(s, t, y, epoch))
        total = sum(terms.values())
        return total, s.logits, terms


def distill(cfg: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    done = already_done(run_dir)
    if done is not None:
        return done
    dcfg = cfg["distill"]
    names = methods.parse_method(dcfg["method"])
    student_arch, method_tag = cfg["model"]["arch"], dcfg["method"]
    device = setup(cfg)
    channels_last = cfg["runtime"]["channels_last"]
    n_classes = data.num_classes(cfg["dataset"])
    teacher, teacher_arch = load_teacher(cfg, n_classes) if names else (None, cfg["teacher"]["arch"] or "-")
    torch.manual_seed(cfg["seed"])
    student = models.build(student_arch, n_classes)
    parts = []
    if names:
        teacher = prepare_module(teacher, device, channels_last).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        context = methods.DistillContext(teacher_arch, dcfg["aggregation"])
        parts = methods.build(names, teacher, student.to(device), dcfg["options"], context)
    train_split = data.load_split(cfg["dataset"], "train")
    train_batches, test_batches = train_stream(cfg, device, train_split), test_stream(cfg, device)
    step = prepare_module(DistillStep(student, teacher, parts, dcfg["ce_weight"]), device, channels_last)
    pair = f"{teacher_arch}-{student_arch}"
    tags = {
        "method": method_tag,
        "teacher": teacher_arch,
        "student": student_arch,
        "pair": pair,
        "model": student_arch,
    }
    meta = {
        "arch": student_arch,
        "num_classes": n_classes,
        "dataset": cfg["dataset"]["name"],
        "seed": cfg["seed"],
        "teacher": teacher_arch,
        "method": method_tag,
    }
    job = open_job(cfg, run_dir, device, "distill", f"{method_tag}-{pair}-s{cfg['seed']}", tags, meta)
    try:
        if parts and not (run_dir / CHECKPOINT).is_file():
            unaugmented = data.BatchStream(
                train_split,
                cfg["runtime"]["eval_batch_size"],
                device,
                *data.normalization(cfg["dataset"]),
                train=False,
                channels_last=channels_last,
            )
            for part in step.parts:
                part.prepare(teacher, unaugmented)
        log(f"distilling {teacher_arch} -> {student_arch} with {method_tag} on {device}")
        result = fit(job, step, student, step.loss, train_batches, test_batches)
        finish(job, result)
    except BaseException as exc:
        job.tracker.abort(exc)
        raise
    return result
