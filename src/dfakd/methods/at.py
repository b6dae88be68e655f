"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017), as in RepDistiller.

For a feature ``f`` (``B x C x H x W``) the attention map is the L2-normalized spatial map::

    at(f) = normalize(mean_c(relu(f)^p).flatten())                 (shape B x HW, unit norm per sample)

and the single term, summed over every pair of teacher/student groups of the same spatial size (their
group-end features), is::

    at = weight * sum_groups mean((at(f_s) - at(f_t))^2)

The zoo's features are pre-activation; RepDistiller used post-ReLU ones, hence the ``relu``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from dfakd.methods.base import DistillMethod, match_groups
from dfakd.models import FeatureNet, NetFeatures


def attention_map(feature: torch.Tensor, p: float) -> torch.Tensor:
    """``normalize(mean_c(relu(f)^p).flatten(1))``: one unit-norm spatial attention vector per sample."""
    return F.normalize(F.relu(feature).pow(p).mean(dim=1).flatten(1), dim=1)


class AT(DistillMethod):
    """Attention transfer: ``at = weight * sum_groups mean((at(f_s) - at(f_t))^2)`` on matched group ends.

    Options: ``weight`` (RepDistiller's 1000) and ``p`` (> 0, the power applied to activations; 2).
    """

    name: ClassVar[str] = "at"
    DEFAULTS: ClassVar[dict[str, Any]] = {"weight": 1000.0, "p": 2.0}
    BOUNDS: ClassVar[dict[str, tuple[float, bool]]] = {"weight": (0.0, True), "p": (0.0, False)}

    def __init__(self, teacher: FeatureNet, student: FeatureNet, options: dict[str, Any]) -> None:
        super().__init__(teacher, student, options)
        self.weight = float(self.options["weight"])
        self.p = float(self.options["p"])
        #: (teacher group index, student group index) of every pair of groups with one spatial size
        self.pairs: list[tuple[int, int]] = [
            (pair.teacher.index, pair.student.index) for pair in match_groups(teacher, student)
        ]

    def forward(
        self, s: NetFeatures, t: NetFeatures, y: torch.Tensor, epoch: float
    ) -> dict[str, torch.Tensor]:
        """Return ``{"at": weight * sum_groups mean((at(f_s) - at(f_t))^2)}``."""
        s_ends, t_ends = s.group_ends, t.group_ends
        total = s.logits.new_zeros(())
        for t_index, s_index in self.pairs:
            diff = attention_map(s_ends[s_index], self.p) - attention_map(t_ends[t_index].detach(), self.p)
            total = total + diff.pow(2).mean()
        return {"at": self.weight * total}
