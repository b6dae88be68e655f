"""Hinton knowledge distillation (Hinton, Vinyals & Dean, 2015), as in RepDistiller and mdistiller.

One term, ``kd``::

    kd = weight * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

with the KL divergence summed over classes and averaged over the batch (``batchmean``). The ``T^2``
factor keeps the gradient magnitude independent of the temperature.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from dfakd.methods.base import DistillMethod
from dfakd.models import FeatureNet, NetFeatures


def kl_div_batchmean(log_p_student: torch.Tensor, log_p_teacher: torch.Tensor) -> torch.Tensor:
    """``KL(p_teacher || p_student)`` from log-probabilities, summed over dim 1 and averaged over the batch.

    Working with teacher log-probabilities keeps the result exactly 0 for identical inputs and finite when
    a teacher probability underflows to 0.
    """
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


class KD(DistillMethod):
    """Hinton KD: ``kd = weight * T^2 * KL(softmax(t/T) || softmax(s/T))`` (batch mean).

    Options: ``weight`` (multiplies the term; 0.9 as in RepDistiller's KD runs, ``-r 0.1 -a 0.9``) and
    ``temperature`` ``T`` (> 0).
    """

    name: ClassVar[str] = "kd"
    DEFAULTS: ClassVar[dict[str, Any]] = {"weight": 0.9, "temperature": 4.0}
    BOUNDS: ClassVar[dict[str, tuple[float, bool]]] = {"weight": (0.0, True), "temperature": (0.0, False)}

    def __init__(self, teacher: FeatureNet, student: FeatureNet, options: dict[str, Any]) -> None:
        super().__init__(teacher, student, options)
        self.weight = float(self.options["weight"])
        self.temperature = float(self.options["temperature"])

    def forward(
        self, s: NetFeatures, t: NetFeatures, y: torch.Tensor, epoch: float
    ) -> dict[str, torch.Tensor]:
        """Return ``{"kd": weight * T^2 * KL(softmax(t/T) || softmax(s/T))}``."""
        T = self.temperature
        log_p_s = F.log_softmax(s.logits / T, dim=1)
        log_p_t = F.log_softmax(t.logits.detach() / T, dim=1)
        return {"kd": self.weight * T * T * kl_div_batchmean(log_p_s, log_p_t)}
