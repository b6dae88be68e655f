"""The supervised training loop shared by ``dfakd train`` (teachers, vanilla students) and ``dfakd
distill`` (every distillation method): epochs, lr schedule, evaluation, checkpoint and resume.

A job's run folder holds, as its results (the source of truth):

- ``config.yaml``: the resolved configuration;
- ``checkpoint.pt``: the resumable state, rewritten atomically after every epoch;
- ``best.pt`` / ``last.pt``: ``{'model': student state_dict, ...}`` (RepDistiller layout);
- ``metrics.csv``: one row per epoch;
- ``result.json``: final figures, written last (its presence means the job finished).
"""

from __future__ import annotations

import csv
import io
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dfakd.data import BatchStream
from dfakd.errors import DfakdError
from dfakd.tracking import Tracker
from dfakd.training import checkpoint as ckpt
from dfakd.training.preemption import Preempted, stop_on_sigterm
from dfakd.training.runtime import Progress, autocast, log
from dfakd.training.schedule import lr_at, set_lr, sgd

#: (x, y, fractional epoch) -> (total loss, student logits, named loss terms for logging)
StepLoss = Callable[
    [torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]
]

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"


@dataclass
class Job:
    """What a loop needs to know about the job it runs."""

    cfg: dict[str, Any]
    run_dir: Path
    device: torch.device
    tracker: Tracker
    meta: dict[str, Any]  # arch, num_classes, dataset, ... stored beside the weights


@torch.inference_mode()
def evaluate(model: nn.Module, stream: BatchStream, precision: str = "fp32") -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over a whole split."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    loss_sum = 0.0
    total = 0
    for x, y in stream:
        with autocast(stream.device, precision):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        total += y.numel()
    model.train(was_training)
    return {
        "top1": 100.0 * correct1 / total,
        "top5": 100.0 * correct5 / total,
        "loss": loss_sum / total,
        "n": total,
    }


def weights_payload(student: nn.Module, meta: dict[str, Any], epoch: int, acc: float) -> dict[str, Any]:
    return {"model": student.state_dict(), "epoch": epoch, "accuracy": acc, **meta}


def write_metrics_csv(path: Path, history: list[dict[str, float]]) -> None:
    if not history:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    ckpt.atomic_write_text(path, buf.getvalue())


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch generator states, as tensors and plain lists (``weights_only``-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def fit(
    job: Job,
    trainable: nn.Module,
    student: nn.Module,
    step_loss: StepLoss,
    train_stream: BatchStream,
    test_stream: BatchStream,
) -> dict[str, Any]:
    """Train ``trainable`` (the student plus any connectors) by SGD on ``step_loss``; evaluate ``student``.

    Resumes from ``checkpoint.pt`` in the run folder when one exists: after the last finished epoch
    (written every epoch), or mid-epoch after a SIGTERM (the remaining batches of that epoch are the
    ones an uninterrupted run would have seen).
    """
    recipe = job.cfg["recipe"]
    precision = job.cfg["runtime"]["precision"]
    run_dir = job.run_dir
    optimizer = sgd(trainable.parameters(), recipe)
    history: list[dict[str, float]] = []
    start_epoch, start_step, partial = 0, 0, None
    best_acc, best_epoch, best_model = -1.0, -1, None
    state_path = run_dir / CHECKPOINT
    if state_path.is_file():
        state = ckpt.load(state_path, map_location=job.device)
        ckpt.load_state_strict(trainable, state["trainable"], str(state_path), job.meta.get("arch", "?"))
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, start_step, partial = state["epoch"], state["step"], state["partial"]
        best_acc, best_epoch, best_model = state["best_acc"], state["best_epoch"], state["best_model"]
        history = state["history"]
        set_rng_state(state["rng"])
        where = f"epoch {start_epoch}" + (f", step {start_step}" if start_step else "")
        log(f"resuming from {state_path} after {where} of {recipe['epochs']} epochs")

    def save_state(epoch: int, step: int, partial: dict | None) -> None:
        ckpt.atomic_save(
            {
                "trainable": trainable.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "step": step,
                "partial": partial,
                "best_acc": best_acc,
                "best_epoch": best_epoch,
                "best_model": best_model,
                "history": history,
                "rng": rng_state(),
            },
            state_path,
        )

    if job.cfg["runtime"]["compile"]:
        step_loss = torch.compile(step_loss)
    steps = len(train_stream)
    if steps == 0:
        raise DfakdError(f"recipe.batch_size {recipe['batch_size']} is larger than the training set")
    wall_start = time.perf_counter()
    with stop_on_sigterm() as stop:
        for epoch in range(start_epoch, recipe["epochs"]):
            lr = lr_at(epoch, recipe)
            set_lr(optimizer, lr)
            train_stream.set_epoch(epoch)
            trainable.train()
            label = f"epoch {epoch + 1}/{recipe['epochs']}"
            progress = Progress(steps, label, job.cfg["runtime"]["log_every"])
            skip = start_step if epoch == start_epoch else 0
            if skip and partial is not None:
                sums, correct, seen, elapsed = (
                    partial["sums"],
                    partial["correct"],
                    partial["seen"],
                    partial["time"],
                )
            else:
                sums, correct, seen, elapsed = {}, torch.zeros((), device=job.device), 0, 0.0
            t0 = time.perf_counter()
            for step, (x, y) in enumerate(train_stream):
                if step < skip:
                    continue  # trained before the interruption; drawn again to keep random streams aligned
                with autocast(job.device, precision):
                    loss, logits, parts = step_loss(x, y, epoch + step / steps)
                if not torch.isfinite(loss):
                    raise DfakdError(
                        f"non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {step + 1}; "
                        f"the last good checkpoint is kept in {state_path}"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for name, value in {"loss": loss, **parts}.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().float()
                correct += (logits.detach().argmax(1) == y).sum()
                seen += y.numel()
                if progress.tty or (step + 1) % progress.every == 0 or step + 1 == steps:
                    progress.update(step, f"loss {loss.item():.4f} lr {lr:.4g}")
                if stop.requested and step + 1 < steps:
                    elapsed += time.perf_counter() - t0
                    partial = {"sums": sums, "correct": correct, "seen": seen, "time": elapsed}
                    save_state(epoch, step + 1, partial)
                    raise Preempted(
                        f"SIGTERM: saved {state_path} at epoch {epoch + 1}, step {step + 1}; rerun to resume"
                    )
            epoch_time = elapsed + time.perf_counter() - t0
            test = evaluate(student, test_stream, precision)
            row = {
                "epoch": epoch + 1,
                "lr": lr,
                **{f"train_{k}": float(v / steps) for k, v in sums.items()},
                "train_acc1": 100.0 * float(correct) / seen,
                "test_acc1": test["top1"],
                "test_acc5": test["top5"],
                "test_loss": test["loss"],
                "epoch_time_s": epoch_time,
                "images_per_s": seen / epoch_time,
            }
            history.append(row)
            if test["top1"] > best_acc:
                best_acc, best_epoch = test["top1"], epoch + 1
                best_model = {k: v.detach().clone() for k, v in student.state_dict().items()}
            # metrics first: a kill between the two re-runs the epoch and logs it again at the same step
            job.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            save_state(epoch + 1, 0, None)
            write_metrics_csv(run_dir / "metrics.csv", history)
            log(
                f"epoch {epoch + 1}/{recipe['epochs']}: train loss {row['train_loss']:.4f}, "
                f"test top-1 {test['top1']:.2f}% (best {best_acc:.2f}% @ {best_epoch}), {epoch_time:.1f}s"
            )
            if stop.requested and epoch + 1 < recipe["epochs"]:
                raise Preempted(f"SIGTERM: saved {state_path} after epoch {epoch + 1}; rerun to resume")

    best_payload = {"model": best_model, "epoch": best_epoch, "accuracy": best_acc, **job.meta}
    ckpt.atomic_save(best_payload, run_dir / "best.pt")
    last = history[-1]
    ckpt.atomic_save(
        weights_payload(student, job.meta, last["epoch"], last["test_acc1"]), run_dir / "last.pt"
    )
    accs = [h["test_acc1"] for h in history]
    result = {
        **job.meta,
        "epochs": recipe["epochs"],
        "best_acc1": best_acc,
        "best_epoch": best_epoch,
        "last_acc1": last["test_acc1"],
        "last_acc5": last["test_acc5"],
        "last_loss": last["test_loss"],
        "mean_last5_acc1": sum(accs[-5:]) / len(accs[-5:]),
        "train_wall_s": sum(h["epoch_time_s"] for h in history),
        "this_run_wall_s": time.perf_counter() - wall_start,
    }
    return result


def finish(job: Job, result: dict[str, Any]) -> None:
    """Write ``result.json`` (last: it marks the job finished), then let the tracker send whatever the
    MLflow run still lacks (final figures, result files as artifacts) and close it."""
    ckpt.atomic_write_text(job.run_dir / RESULT, json.dumps(result, indent=2) + "\n")
    job.tracker.finish()
    log(
        f"done: top-1 best {result['best_acc1']:.2f}%, last {result['last_acc1']:.2f}%"
        f"; {job.tracker.describe()}"
    )
