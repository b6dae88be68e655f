"""The one resumable epoch loop that ``train``, ``distill`` and ``search`` run, and the run folder it
resumes from.

A job is an :class:`EpochTask`: its state, its batches per epoch, its training step and what it adds to an
epoch's row. The loop around it is written once, here:

- **resume only what was interrupted, with the same settings.** A checkpoint carries the job's
  *settings* (what decides its result) and their fingerprint, and whether the job finished.
  :func:`open_run` decides from what a run folder holds: its finished result with the same fingerprint
  (nothing to do), an unfinished checkpoint with the same fingerprint (resume), or anything else (train
  afresh, after setting the earlier run's files aside under ``superseded/``, saying why in one line). A
  finished result with *other* settings is refused unless the caller asks to retrain;
- a checkpoint after every epoch (atomic), a mid-epoch checkpoint and exit 143 on SIGTERM, and the RNG
  states of Python, NumPy and torch, so that a resumed job ends exactly where an uninterrupted one would;
- the non-finite check of the step's losses, read back every ``runtime.finite_check_every`` steps (a read
  waits for the GPU) and always before a checkpoint is written, naming the first bad epoch and step;
- per-epoch rows in a CSV and in MLflow, progress output.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import random
import time
from collections.abc import Iterable, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dfakd.data import BatchStream
from dfakd.errors import DfakdError
from dfakd.files import atomic_save, atomic_write_json, atomic_write_text, load_checkpoint, read_json
from dfakd.tracking import SUPERSEDED, Tracker
from dfakd.training.preemption import Preempted, stop_on_sigterm
from dfakd.training.runtime import Progress, autocast, log

CHECKPOINT_FORMAT = "dfakd-checkpoint/2"
#: every file a job may write into its run folder: what is set aside when a run folder is reused
JOB_FILES = (
    "config.yaml", "settings.json", "aggregation.yaml", "checkpoint.pt", "search_checkpoint.pt", "best.pt",
    "last.pt", "metrics.csv", "search_metrics.csv", "result.json", "search.json", "eval.json",
    "mlflow_run.json", "alpha_trajectory.csv", "alphas.png", "alpha_trajectory.png",
)  # fmt: skip


# ------------------------------------------------------------------------------------------ the run folder


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def describe_changes(old: dict[str, Any] | None, new: dict[str, Any], limit: int = 6) -> str:
    """``recipe.lr 0.05 -> 0.1, distill.options.kd.weight 0.9 -> 0.5`` (what differs between settings)."""
    if old is None:
        return "settings unknown (written by an older dfakd)"
    keys = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
    shown = [f"{k} {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys[:limit]]
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(shown) + more if keys else "no setting differs"


@dataclass
class RunFolder:
    """What :func:`open_run` found in a run folder and decided to do with it."""

    path: Path
    checkpoint: Path
    result: Path
    settings: dict[str, Any]
    fingerprint: str
    done: dict[str, Any] | None = None  # the finished result: nothing to do
    resume_state: dict[str, Any] | None = None  # the unfinished checkpoint to resume from
    set_aside_reason: str | None = None  # earlier files to move to superseded/ when the job opens
    leftovers: list[Path] = field(default_factory=list)

    def begin(self) -> Path | None:
        """Called when the job opens (every input checked): set the earlier run's files aside; returns the
        folder they went to (None: nothing was set aside)."""
        if not self.leftovers:
            return None
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        target = self.path / SUPERSEDED / stamp
        target.mkdir(parents=True)
        for path in self.leftovers:
            if path.exists():
                path.rename(target / path.name)
        log(f"{self.set_aside_reason}: the earlier run's files are set aside in {target}; training afresh")
        self.leftovers = []
        return target

    def finish(self, result: dict[str, Any], final_state: dict[str, Any]) -> None:
        """Write the result file (with the fingerprint), then mark the checkpoint finished."""
        atomic_write_json(self.result, {**result, "fingerprint": self.fingerprint})
        atomic_save({**final_state, "finished": True}, self.checkpoint)


def open_run(
    run_dir: str | Path, checkpoint_name: str, result_name: str, settings: dict[str, Any], retrain: bool
) -> RunFolder:
    """Decide what to do with ``run_dir`` for a job with ``settings``; writes nothing."""
    run_dir = Path(run_dir)
    run = RunFolder(
        run_dir, run_dir / checkpoint_name, run_dir / result_name, settings, fingerprint(settings)
    )
    if run.result.is_file() and not retrain:
        try:
            result = read_json(run.result, "result file")
        except DfakdError as exc:
            raise DfakdError(
                f"{exc}; pass --retrain to set the run folder's files aside and train afresh"
            ) from None
        if not isinstance(result, dict):
            raise DfakdError(
                f"result file {run.result} must hold a JSON object; pass --retrain to train afresh"
            )
        if result.get("fingerprint") == run.fingerprint:
            log(f"{run_dir} already finished with these settings ({result_name} present); nothing to do")
            run.done = result
            return run
        state = _peek_checkpoint(run.checkpoint)
        raise DfakdError(
            f"{run_dir} holds a finished run with other settings "
            f"({describe_changes(state.get('settings') if state else None, settings)}); "
            "pass --retrain to train it afresh (the finished run is kept under "
            f"{run_dir / SUPERSEDED}/), or choose another run folder"
        )
    state = None if retrain else _peek_checkpoint(run.checkpoint)  # --retrain sets even a corrupt one aside
    if retrain:
        run.set_aside_reason = "--retrain"
    elif state is not None:
        if state.get("fingerprint") != run.fingerprint:
            changes = describe_changes(state.get("settings"), settings)
            run.set_aside_reason = f"settings changed since {run.checkpoint} was written ({changes})"
        elif state.get("finished"):
            run.set_aside_reason = f"{run.checkpoint} is of a finished run whose outputs are gone (a rerun)"
        else:
            run.resume_state = state
            return run
    run.leftovers = [run_dir / name for name in JOB_FILES if (run_dir / name).exists()]
    if run.leftovers and run.set_aside_reason is None:
        run.set_aside_reason = f"{run_dir} holds files of an earlier run that saved no checkpoint"
    return run


def _peek_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        # written by an older dfakd or something else: never resumed, set aside
        return {"fingerprint": None, "settings": None, "finished": False}
    return state


# ---------------------------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def evaluate(model: nn.Module, stream: BatchStream, precision: str = "fp32") -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over a whole split; sums stay on the device
    until the end (one read-back per split)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=stream.device)  # loss, correct1, correct5
    total = 0
    for x, y in stream:
        with autocast(stream.device, precision):
            logits = model(x)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums += torch.stack(
            [
                F.cross_entropy(logits, y, reduction="sum").double(),
                (top[:, 0] == y).sum().double(),
                (top == y[:, None]).any(dim=1).sum().double(),
            ]
        )
        total += y.numel()
    model.train(was_training)
    loss_sum, correct1, correct5 = sums.tolist()
    return {
        "top1": 100.0 * correct1 / total,
        "top5": 100.0 * correct5 / total,
        "loss": loss_sum / total,
        "n": total,
    }


# ------------------------------------------------------------------------------------------------ RNG state


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
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# -------------------------------------------------------------------------------------------------- the loop


class EpochTask(Protocol):
    """One job's training, as the loop sees it."""

    epochs: int
    #: the step's terms whose finiteness is checked (a non-finite one stops the job)
    checked_terms: tuple[str, ...]

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def batches(self, epoch: int) -> Iterable[Any] | Sized:
        """Set up epoch ``epoch`` (lr, train mode) and return its batches (``len()`` = steps)."""
        ...

    def step(self, epoch: int, step: int, steps: int, batch: Any) -> dict[str, torch.Tensor]:
        """Train on one batch; return the step's named terms as detached scalar tensors."""
        ...

    def end_epoch(self, epoch: int, means: dict[str, float], epoch_time: float) -> dict[str, float]:
        """After the epoch's last step: evaluate, and return the epoch's row (``epoch`` added by the loop)."""
        ...


class FiniteWatch:
    """Collects the checked terms of each step on the device and reads them back every ``every`` steps
    (and before every checkpoint): one wait for the GPU per check, not per step."""

    def __init__(self, names: tuple[str, ...], every: int, where: str) -> None:
        self.names, self.every, self.where = names, max(1, every), where
        self.pending: list[tuple[int, int, torch.Tensor]] = []

    def observe(self, epoch: int, step: int, terms: dict[str, torch.Tensor]) -> None:
        self.pending.append((epoch, step, torch.stack([terms[n].detach().float() for n in self.names])))
        if len(self.pending) >= self.every:
            self.check()

    def check(self) -> None:
        if not self.pending:
            return
        values = torch.stack([v for _, _, v in self.pending])
        finite = torch.isfinite(values)
        if bool(finite.all()):
            self.pending = []
            return
        row, col = (int(i) for i in (~finite).nonzero()[0])
        epoch, step, _ = self.pending[row]
        raise DfakdError(
            f"non-finite {self.names[col]} ({values[row, col].item()}) at epoch {epoch + 1}, "
            f"step {step + 1}; "
            f"the last good checkpoint is kept in {self.where}"
        )


def write_metrics_csv(path: Path, history: list[dict[str, float]]) -> None:
    if not history:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buf.getvalue())


def run_step(
    task: EpochTask,
    watch: FiniteWatch,
    sums: dict[str, torch.Tensor],
    progress: Progress,
    epoch: int,
    step: int,
    steps: int,
    batch: Any,
) -> dict[str, torch.Tensor]:
    """One step of the loop: the task's step, the deferred finiteness check, the epoch's sums (on the
    device) and progress output (which reads the terms back only when it prints a line). Nothing here
    waits for the GPU, except a finiteness check every ``watch.every`` steps."""
    terms = task.step(epoch, step, steps, batch)
    watch.observe(epoch, step, terms)
    for name, value in terms.items():
        sums[name] = sums[name] + value if name in sums else value.clone()
    progress.update(step, lambda: "  ".join(f"{k} {float(v):.4f}" for k, v in terms.items()))
    return terms


def run_epochs(
    run: RunFolder,
    task: EpochTask,
    tracker: Tracker,
    runtime: dict[str, Any],
    metrics_name: str,
    label: str = "epoch",
) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """Run ``task`` from where ``run`` left off to its last epoch; return the per-epoch rows and the final
    checkpoint state (for :meth:`RunFolder.finish`)."""
    history: list[dict[str, float]] = []
    start_epoch, start_step, partial = 0, 0, None
    state = run.resume_state
    if state is not None:
        task.load_state_dict(state)
        start_epoch, start_step, partial, history = (
            state["epoch"],
            state["step"],
            state["partial"],
            state["history"],
        )
        set_rng_state(state["rng"])
        where = f"epoch {start_epoch}" + (f", step {start_step}" if start_step else "")
        log(f"resuming from {run.checkpoint} after {where} of {task.epochs} epochs")
        run.resume_state = None

    def checkpoint(epoch: int, step: int, partial: dict | None) -> dict[str, Any]:
        return {
            **task.state_dict(),
            "format": CHECKPOINT_FORMAT,
            "settings": run.settings,
            "fingerprint": run.fingerprint,
            "finished": False,
            "epoch": epoch,
            "step": step,
            "partial": partial,
            "history": history,
            "rng": rng_state(),
        }

    watch = FiniteWatch(task.checked_terms, runtime["finite_check_every"], str(run.checkpoint))
    with stop_on_sigterm() as stop:
        for epoch in range(start_epoch, task.epochs):
            batches = task.batches(epoch)
            steps = len(batches)
            progress = Progress(steps, f"{label} {epoch + 1}/{task.epochs}", runtime["log_every"])
            skip = start_step if epoch == start_epoch else 0
            sums, elapsed = (dict(partial["sums"]), partial["time"]) if skip and partial else ({}, 0.0)
            t0 = time.perf_counter()
            for step, batch in enumerate(batches):
                if step < skip:
                    continue  # trained before the interruption; drawn again to keep random streams aligned
                run_step(task, watch, sums, progress, epoch, step, steps, batch)
                if stop.requested and step + 1 < steps:
                    watch.check()
                    partial = {"sums": sums, "time": elapsed + time.perf_counter() - t0}
                    atomic_save(checkpoint(epoch, step + 1, partial), run.checkpoint)
                    raise Preempted(
                        f"SIGTERM: saved {run.checkpoint} at epoch {epoch + 1}, step {step + 1}; "
                        "rerun to resume"
                    )
            watch.check()
            epoch_time = elapsed + time.perf_counter() - t0
            means = {name: float(value) / steps for name, value in sums.items()}
            row = {"epoch": epoch + 1, **task.end_epoch(epoch, means, epoch_time)}
            history.append(row)
            # metrics first: a kill between the two re-runs the epoch and logs it again at the same step
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            atomic_save(checkpoint(epoch + 1, 0, None), run.checkpoint)
            write_metrics_csv(run.path / metrics_name, history)
            if stop.requested and epoch + 1 < task.epochs:
                raise Preempted(f"SIGTERM: saved {run.checkpoint} after epoch {epoch + 1}; rerun to resume")
    return history, checkpoint(task.epochs, 0, None)
