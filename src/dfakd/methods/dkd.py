"""Decoupled knowledge distillation (Zhao, Cui, Song, Qiu & Liang, CVPR 2022), mdistiller's CIFAR setup.

With ``p = softmax(z / T)`` over the classes and ``y`` the label, two terms (batch means)::

    b         = [p_y, 1 - p_y]                                   (target vs non-target, binary)
    q_j       = softmax(z / T - 1000 * onehot(y))_j              (distribution among the non-target classes)
    dkd_tckd  = weight * w(epoch) * alpha * T^2 * KL(b_teacher || b_student)
    dkd_nckd  = weight * w(epoch) * beta  * T^2 * KL(q_teacher || q_student)
    w(epoch)  = min(epoch / warmup_epochs, 1)                    (1 when warmup_epochs is 0)

``1 - p_y`` is computed as ``exp(logsumexp_{j != y} log p_j)`` in log space, the same quantity as the
paper's (and mdistiller's) sum of non-target probabilities without its ``log(0)`` risk.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from dfakd.errors import DfakdError
from dfakd.methods.base import DistillMethod
from dfakd.methods.kd import kl_div_batchmean
from dfakd.models import FeatureNet, NetFeatures

#: subtracted from the (temperature-scaled) target logit to mask it out of the non-target softmax
MASK_VALUE = 1000.0


def binary_log_probs(logits: torch.Tensor, gt_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log [p_y, 1 - p_y]`` per sample (shape ``B x 2``) for ``p = softmax(logits / T)``."""
    log_p = F.log_softmax(logits / temperature, dim=1)
    log_target = log_p.masked_fill(~gt_mask, float("-inf")).logsumexp(dim=1)
    log_other = log_p.masked_fill(gt_mask, float("-inf")).logsumexp(dim=1)
    return torch.stack([log_target, log_other], dim=1)


def non_target_log_probs(logits: torch.Tensor, gt_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log softmax(logits / T - 1000 * onehot(y))``: the distribution among the non-target classes."""
    return F.log_softmax(logits / temperature - MASK_VALUE * gt_mask.to(logits.dtype), dim=1)


class DKD(DistillMethod):
    """Decoupled KD: target-class (TCKD) and non-target-class (NCKD) terms, with a linear warmup.

    ``dkd_tckd = weight * w * alpha * T^2 * KL(b_t || b_s)`` with ``b = [p_y, 1 - p_y]``;
    ``dkd_nckd = weight * w * beta * T^2 * KL(q_t || q_s)`` with ``q`` the softmax over non-target classes;
    ``w = min(epoch / warmup_epochs, 1)``. Defaults are mdistiller's CIFAR-100 ones (alpha 1, beta 8, T 4,
    20 warmup epochs).
    """

    name: ClassVar[str] = "dkd"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "weight": 1.0,
        "alpha": 1.0,
        "beta": 8.0,
        "temperature": 4.0,
        "warmup_epochs": 20,
    }
    BOUNDS: ClassVar[dict[str, tuple[float, bool]]] = {
        "weight": (0.0, True),
        "alpha": (0.0, True),
        "beta": (0.0, True),
        "temperature": (0.0, False),
        "warmup_epochs": (0.0, True),
    }

    def __init__(self, teacher: FeatureNet, student: FeatureNet, options: dict[str, Any]) -> None:
        super().__init__(teacher, student, options)
        self.weight = float(self.options["weight"])
        self.alpha = float(self.options["alpha"])
        self.beta = float(self.options["beta"])
        self.temperature = float(self.options["temperature"])
        self.warmup_epochs = float(self.options["warmup_epochs"])

    def warmup_factor(self, epoch: float) -> float:
        """``min(epoch / warmup_epochs, 1)``; 1 when ``warmup_epochs`` is 0."""
        if self.warmup_epochs == 0:
            return 1.0
        return min(float(epoch) / self.warmup_epochs, 1.0)

    def forward(
        self, s: NetFeatures, t: NetFeatures, y: torch.Tensor, epoch: float
    ) -> dict[str, torch.Tensor]:
        """Return ``{"dkd_tckd": ..., "dkd_nckd": ...}``, each weighted (see the class docstring)."""
        logits_s, logits_t = s.logits, t.logits.detach()
        if logits_s.shape[1] < 2:
            raise DfakdError("method 'dkd' needs at least 2 classes")
        gt_mask = F.one_hot(y.reshape(-1).long(), num_classes=logits_s.shape[1]).bool()
        T = self.temperature
        scale = self.weight * self.warmup_factor(epoch) * T * T
        tckd = kl_div_batchmean(
            binary_log_probs(logits_s, gt_mask, T), binary_log_probs(logits_t, gt_mask, T)
        )
        nckd = kl_div_batchmean(
            non_target_log_probs(logits_s, gt_mask, T), non_target_log_probs(logits_t, gt_mask, T)
        )
        return {"dkd_tckd": scale * self.alpha * tckd, "dkd_nckd": scale * self.beta * nckd}
