"""Stage 2's step loss: the student's cross-entropy plus the configured methods' terms (``dfakd distill``
in :mod:`dfakd.jobs.distill` runs it in the training loop).

One teacher forward per step feeds every method (``forward_features`` collects all candidates and the
logits at once). The logged ``ce`` is the plain cross-entropy; the loss adds ``ce_weight`` times it
(logged as ``ce_weighted`` when the weight is not 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfakd import models


class DistillStep(nn.Module):
    """The student and the methods' trainable parts (one module, so one optimizer and one checkpoint)."""

    def __init__(self, student: models.FeatureNet, teacher: models.FeatureNet, parts: list, ce_weight: float):
        super().__init__()
        self.student = student
        self.parts = nn.ModuleList(parts)
        self.ce_weight = ce_weight
        self.teacher = [teacher]  # a list: not a submodule, so not trained nor saved

    def loss(self, x: torch.Tensor, y: torch.Tensor, epoch: float):
        s = self.student.forward_features(x)
        ce = F.cross_entropy(s.logits.float(), y)
        terms: dict[str, torch.Tensor] = {"ce": ce}
        total = ce if self.ce_weight == 1.0 else self.ce_weight * ce
        if self.ce_weight != 1.0:
            terms["ce_weighted"] = total
        if len(self.parts):
            with torch.no_grad():
                t = self.teacher[0].forward_features(x)
            for part in self.parts:
                method_terms = part(s, t, y, epoch)
                terms.update(method_terms)
                total = total + sum(method_terms.values())
        return total, s.logits, terms
