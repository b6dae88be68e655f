"""Optimizer and learning-rate schedule from a recipe. The lr is a pure function of the epoch, so a
resumed job needs no scheduler state."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


def lr_at(epoch: int, recipe: dict[str, Any]) -> float:
    """Learning rate for 0-based ``epoch``."""
    base = recipe["lr"]
    warmup = recipe["warmup_epochs"]
    if warmup and epoch < warmup:
        return base * (0.1 + 0.9 * epoch / warmup)
    if recipe["schedule"] == "cosine":
        span = max(1, recipe["epochs"] - warmup)
        return 0.5 * base * (1 + math.cos(math.pi * (epoch - warmup) / span))
    passed = sum(1 for m in recipe["milestones"] if epoch >= m)
    return base * recipe["gamma"] ** passed


def sgd(
    params: Iterable[torch.nn.Parameter], recipe: dict[str, Any], device: torch.device | None = None
) -> torch.optim.SGD:
    """SGD from a recipe; on CUDA the multi-tensor (``foreach``) update, one kernel launch per step
    instead of one per parameter."""
    return torch.optim.SGD(
        params,
        lr=recipe["lr"],
        momentum=recipe["momentum"],
        nesterov=recipe["nesterov"] and recipe["momentum"] > 0,
        weight_decay=recipe["weight_decay"],
        foreach=device is not None and device.type == "cuda",
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
