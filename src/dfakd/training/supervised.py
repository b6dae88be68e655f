"""Supervised training as an :class:`~dfakd.training.loop.EpochTask`: SGD on a step loss, the recipe's lr per
epoch, evaluation of the student after every epoch, the best epoch's weights kept. ``dfakd train``
(cross-entropy alone) and ``dfakd distill`` (cross-entropy plus the methods' terms) both run it.

A run folder's results: ``best.pt`` / ``last.pt`` (``{'model': student state_dict, ...}``, RepDistiller's
layout), ``metrics.csv`` (one row per epoch) and the figures :meth:`SupervisedTask.finish` returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfakd.data import BatchStream
from dfakd.files import atomic_save
from dfakd.training.loop import evaluate
from dfakd.training.runtime import autocast, compile_mode, compiled, log
from dfakd.training.schedule import lr_at, set_lr, sgd

#: (x, y, fractional epoch) -> (total loss, student logits, named loss terms for logging)
StepLoss = Callable[
    [torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]
]


class SupervisedTask:
    """Train ``trainable`` (the student plus any connectors) on ``step_loss``; evaluate ``student``."""

    checked_terms = ("loss",)

    def __init__(
        self,
        cfg: dict[str, Any],
        trainable: nn.Module,
        student: nn.Module,
        step_loss: StepLoss,
        train_stream: BatchStream,
        test_stream: BatchStream,
        device: torch.device,
    ) -> None:
        self.recipe = cfg["recipe"]
        self.precision = cfg["runtime"]["precision"]
        self.epochs = self.recipe["epochs"]
        self.trainable, self.student = trainable, student
        self.compile_mode = compile_mode(cfg["runtime"]["compile"])
        self.step_loss = compiled(step_loss, self.compile_mode)
        #: the first step's wall time when compiled (compilation included), kept across a resume
        self.compile_time_s: float | None = None
        self.train_stream, self.test_stream = train_stream, test_stream
        self.device = device
        self.optimizer = sgd(trainable.parameters(), self.recipe, device)
        self.best_acc, self.best_epoch, self.best_model = -1.0, -1, None
        self.lr = self.recipe["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {
            "trainable": self.trainable.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "best_acc": self.best_acc,
            "best_epoch": self.best_epoch,
            "best_model": self.best_model,
            "compile_time_s": self.compile_time_s,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainable.load_state_dict(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.best_acc, self.best_epoch, self.best_model = (
            state["best_acc"],
            state["best_epoch"],
            state["best_model"],
        )
        self.compile_time_s = state.get("compile_time_s")

    def batches(self, epoch: int) -> BatchStream:
        self.lr = lr_at(epoch, self.recipe)
        set_lr(self.optimizer, self.lr)
        self.train_stream.set_epoch(epoch)
        self.trainable.train()
        return self.train_stream

    def step(self, epoch: int, step: int, steps: int, batch) -> dict[str, torch.Tensor]:
        x, y = batch
        first = self.compile_mode is not None and self.compile_time_s is None
        t0 = time.perf_counter()
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: earlier graph outputs may be reused
        with autocast(self.device, self.precision):
            loss, logits, parts = self.step_loss(x, y, epoch + step / steps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        acc1 = (logits.detach().argmax(1) == y).float().mean() * 100.0
        terms = {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()}}
        if self.compile_mode == "reduce-overhead":  # CUDA-graph outputs are overwritten by the next replay
            terms = {k: v.clone() for k, v in terms.items()}
        if first:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # once, to time the compilation
            self.compile_time_s = time.perf_counter() - t0
            log(
                f"first step (torch.compile mode {self.compile_mode}, compilation included): "
                f"{self.compile_time_s:.1f}s"
            )
        return {**terms, "acc1": acc1}

    def end_epoch(self, epoch: int, means: dict[str, float], epoch_time: float) -> dict[str, float]:
        test = evaluate(self.student, self.test_stream, self.precision)
        if test["top1"] > self.best_acc:
            self.best_acc, self.best_epoch = test["top1"], epoch + 1
            self.best_model = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
        seen = len(self.train_stream) * self.train_stream.batch_size
        row = {
            "lr": self.lr,
            **{f"train_{k}": v for k, v in means.items()},
            "test_acc1": test["top1"],
            "test_acc5": test["top5"],
            "test_loss": test["loss"],
            "epoch_time_s": epoch_time,
            "images_per_s": seen / epoch_time,
        }
        log(
            f"epoch {epoch + 1}/{self.epochs}: train loss {means['loss']:.4f}, "
            f"test top-1 {test['top1']:.2f}% "
            f"(best {self.best_acc:.2f}% @ {self.best_epoch}), {epoch_time:.1f}s"
        )
        return row

    def finish(self, run_dir: Path, history: list[dict[str, float]], meta: dict[str, Any]) -> dict[str, Any]:
        """Write ``best.pt`` and ``last.pt``; return the job's final figures."""
        atomic_save(
            {"model": self.best_model, "epoch": self.best_epoch, "accuracy": self.best_acc, **meta},
            run_dir / "best.pt",
        )
        last = history[-1]
        atomic_save(
            {
                "model": self.student.state_dict(),
                "epoch": last["epoch"],
                "accuracy": last["test_acc1"],
                **meta,
            },
            run_dir / "last.pt",
        )
        accs = [h["test_acc1"] for h in history]
        return {
            **meta,
            "epochs": self.epochs,
            "best_acc1": self.best_acc,
            "best_epoch": self.best_epoch,
            "last_acc1": last["test_acc1"],
            "last_acc5": last["test_acc5"],
            "last_loss": last["test_loss"],
            "mean_last5_acc1": sum(accs[-5:]) / len(accs[-5:]),
            "train_wall_s": sum(h["epoch_time_s"] for h in history),
            "compile_time_s": self.compile_time_s,  # the first step with runtime.compile (null without)
        }
