"""``dfakd search``: stage 1, the bridge-loss search (:mod:`dfakd.methods.bridge`) run in the resumable loop.

The training split is cut into two stratified halves (seeded): each step trains beta on a batch of one
(the held-out half, L_val), then the weights on a batch of the other (L_train). ``groupwise`` runs one
phase of ``search.epochs`` epochs per matched group; at the end of its phase a group's alphas are derived
(``derive.*``) and kept fixed. ``search.warmup_epochs`` (ours) come first: the weights step as usual (CE +
the bridge loss as the first phase starts it: uniform alphas in its groups, ``last`` in the others), the
betas do not (their bridge loss on the beta half is still measured, for the logged metrics). Results in the
run folder:
``search.json`` (final beta/alpha per group), ``alpha_trajectory.csv``, ``alphas.png`` (heatmap),
``alpha_trajectory.png`` and ``search_metrics.csv`` (one row per epoch).
"""

from __future__ import annotations

import csv
import io
import itertools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dfakd import data, models
from dfakd.files import atomic_write_text
from dfakd.jobs.common import (
    check_batch_size,
    check_run_dir,
    finish_job,
    frozen,
    load_teacher,
    open_job,
    stage_settings,
    train_stream,
)
from dfakd.methods import aggregation as agg_mod
from dfakd.methods.base import GroupPair
from dfakd.methods.bridge import Searcher, cosine_lr, phases
from dfakd.plots import alpha_heatmap, alpha_trajectory_plot
from dfakd.training.loop import run_epochs
from dfakd.training.runtime import log, prepare_module, setup

CHECKPOINT, RESULT = "search_checkpoint.pt", "search.json"


class PairedBatches:
    """A weight-half batch and a beta-half batch per step; as many steps as the weight half has."""

    def __init__(self, weights: data.BatchStream, betas: data.BatchStream) -> None:
        self.weights, self.betas = weights, betas

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self):
        return zip(self.weights, itertools.cycle(self.betas))


class SearchTask:
    """The search as an epoch task: phases of ``search.epochs`` epochs, the alpha trajectory, and the
    groupwise fixing of a group when its phase ends."""

    checked_terms = ("w_loss", "beta_loss")

    def __init__(self, cfg: dict[str, Any], searcher: Searcher, batches: PairedBatches) -> None:
        self.cfg, self.scfg, self.searcher, self.paired = cfg, cfg["search"], searcher, batches
        self.plan = phases(self.scfg["schedule"], len(searcher.pairs))
        self.warmup = self.scfg["warmup_epochs"]
        self.epochs = self.warmup + len(self.plan) * self.scfg["epochs"]
        self.steps = len(batches)
        self.trajectory: list[list[float]] = []  # [step, phase, group, alpha_0, alpha_1, ...]
        self.pending: list[tuple[int, int, int, torch.Tensor]] = []  # recorded alphas, read at epoch end

    def flush_trajectory(self) -> list[list[float]]:
        """The recorded alphas as rows (read back from the device here, not at every step)."""
        self.trajectory.extend([step, phase, i, *alpha.tolist()] for step, phase, i, alpha in self.pending)
        self.pending = []
        return self.trajectory

    def state_dict(self) -> dict[str, Any]:
        return {**self.searcher.state_dict(), "trajectory": self.flush_trajectory()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.searcher.load_state_dict(state)
        self.trajectory = state["trajectory"]

    def phase(self, epoch: int) -> tuple[int, list[int]]:
        """The phase of ``epoch`` and its active groups; the warm-up epochs belong to the first phase."""
        phase = max(0, epoch - self.warmup) // self.scfg["epochs"]
        return phase, self.plan[phase]

    def warming_up(self, epoch: int) -> bool:
        return epoch < self.warmup

    def batches(self, epoch: int) -> PairedBatches:
        self.searcher.bridge.active = self.phase(epoch)[1]
        self.paired.weights.set_epoch(epoch)
        self.paired.betas.set_epoch(epoch)
        self.searcher.student.train()
        self.searcher.bridge.train()
        return self.paired

    def step(self, epoch: int, step: int, steps: int, batch) -> dict[str, torch.Tensor]:
        (x, y), (xv, yv) = batch
        phase, groups = self.phase(epoch)
        global_step = epoch * steps + step
        scfg = self.scfg
        lr = cosine_lr(global_step, self.epochs * steps, scfg["w_lr"], scfg["w_lr_min"])
        # Algorithm 1: beta_i first, then w (during the warm-up the beta-half loss is only measured)
        beta_loss = self.searcher.beta_step(xv, yv, groups, update=not self.warming_up(epoch))
        terms = self.searcher.weight_step(x, y, lr)
        terms["beta_loss"] = beta_loss
        if global_step % scfg["record_every"] == 0 or step + 1 == steps:
            with torch.no_grad():
                for i in groups:
                    self.pending.append(
                        (global_step + 1, phase, i, self.searcher.bridge.alpha(i).detach().clone())
                    )
        return terms

    def end_epoch(self, epoch: int, means: dict[str, float], epoch_time: float) -> dict[str, float]:
        bridge, pairs = self.searcher.bridge, self.searcher.pairs
        self.flush_trajectory()
        phase, groups = self.phase(epoch)
        phase_end = not self.warming_up(epoch) and (epoch + 1 - self.warmup) % self.scfg["epochs"] == 0
        if self.scfg["schedule"] == "groupwise" and phase_end:
            dcfg = self.cfg["derive"]
            mode = dcfg["mode"] if dcfg["mode"] in agg_mod.SEARCHED_MODES else "full"
            for i in groups:
                alpha = bridge.alpha(i).tolist()
                weights = agg_mod.derive_weights(alpha, mode, dcfg["tau"], dcfg["k"])
                log(f"group {pairs[i].spatial}px: {fmt(alpha)} -> fixed {fmt(weights)}")
                bridge.fix(i, weights)
        row = {**means, "epoch_time_s": epoch_time}
        with torch.no_grad():
            for i, p in enumerate(pairs):
                for name, a in zip(p.teacher.names, F.softmax(bridge.betas[i], 0).tolist(), strict=True):
                    row[f"alpha.g{p.spatial}.{name}"] = a
        what = "warm-up, betas fixed" if self.warming_up(epoch) else f"groups {groups}"
        log(
            f"search epoch {epoch + 1}/{self.epochs} ({what}): w-loss {means['w_loss']:.4f}, "
            f"bridge (beta half) {means['beta_loss']:.4f}, {epoch_time:.1f}s"
        )
        return row


def fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{a:.3f}" for a in values) + "]"


def search(cfg: dict[str, Any], run_dir: str | Path, retrain: bool = False) -> dict[str, Any]:
    student_arch = cfg["model"]["arch"]
    device = setup(cfg)
    n_classes = data.num_classes(cfg["dataset"])
    teacher, teacher_arch, teacher_sha = load_teacher(cfg, n_classes)
    settings = stage_settings(cfg, "search", {"teacher.sha256": teacher_sha})
    run = check_run_dir(run_dir, CHECKPOINT, RESULT, settings, retrain)
    if run.done is not None:
        return run.done
    channels_last = cfg["runtime"]["channels_last"]
    teacher = frozen(teacher, device, channels_last)
    full = data.load_split(cfg["dataset"], "train")
    w_idx, b_idx = data.stratified_halves(full.labels, cfg["seed"])
    batch_size = cfg["search"]["batch_size"]
    check_batch_size("search.batch_size", batch_size, min(len(w_idx), len(b_idx)), "half the training split")
    paired = PairedBatches(
        train_stream(cfg, device, full.subset(w_idx), batch_size),
        train_stream(cfg, device, full.subset(b_idx), batch_size, stream_id=1),
    )
    torch.manual_seed(cfg["seed"])
    student = prepare_module(models.build(student_arch, n_classes), device, channels_last)
    searcher = Searcher(cfg, teacher, student, device)
    task = SearchTask(cfg, searcher, paired)
    pair = f"{teacher_arch}-{student_arch}"
    # no `method` tag: a search is no student and joins no method's group (stage=search says what it is)
    tags = {"teacher": teacher_arch, "student": student_arch, "pair": pair, "model": student_arch}
    name = f"search-{cfg['dataset']['name']}-{pair}-s{cfg['seed']}"
    job = open_job(cfg, run, device, "search", name, tags)
    try:
        shared = {p.spatial for p in searcher.pairs}
        skipped = [g.spatial for g in teacher.describe_groups() if g.spatial not in shared]
        log(f"searching groups at {sorted(shared, reverse=True)} px")
        if skipped:
            log(f"teacher groups at {skipped} px have no student group of that size and are left out")
        history, final_state = run_epochs(
            run, task, job.tracker, cfg["runtime"], "search_metrics.csv", label="search epoch"
        )
        result = {
            "teacher": teacher_arch,
            "student": student_arch,
            "dataset": cfg["dataset"]["name"],
            "seed": cfg["seed"],
            "schedule": cfg["search"]["schedule"],
            "steps": task.trajectory[-1][0] if task.trajectory else 0,
            "skipped_teacher_groups": skipped,
            "groups": searcher.result(),
        }
        write_plots(run.path, result, task.trajectory, searcher.pairs)
        finish_job(job, result, final_state)
    except BaseException as exc:
        job.tracker.abort(exc)
        raise
    return result


def write_plots(
    run_dir: Path, result: dict[str, Any], trajectory: list[list[float]], pairs: list[GroupPair]
) -> None:
    write_trajectory(run_dir / "alpha_trajectory.csv", trajectory, pairs)
    alpha_heatmap(result, run_dir / "alphas.png")
    alpha_trajectory_plot(run_dir / "alpha_trajectory.csv", run_dir / "alpha_trajectory.png")


def write_trajectory(path: Path, trajectory: list[list[float]], pairs: list[GroupPair]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["step", "phase", "spatial", "layer", "alpha"])
    for row in trajectory:
        step, phase, i = int(row[0]), int(row[1]), int(row[2])
        for name, a in zip(pairs[i].teacher.names, row[3:], strict=True):
            writer.writerow([step, phase, pairs[i].spatial, name, f"{a:.6f}"])
    atomic_write_text(path, buf.getvalue())
