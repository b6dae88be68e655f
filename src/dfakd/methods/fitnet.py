"""FitNets hint learning (Romero et al., ICLR 2015), as in RepDistiller but without its stage-1 pre-training.

One pair of teacher/student groups of the same spatial size (the *hint* pair) is chosen; a regressor
``r`` (1x1 convolution from the student's to the teacher's channels without bias, batch norm, ReLU) is
trained with the student, and the single term is::

    fitnet = weight * mean((r(relu(f_s)) - relu(f_t))^2)

on the two group-end features (pre-activation in the zoo, hence the ``relu``: RepDistiller's hints were
post-ReLU).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dfakd.errors import DfakdError
from dfakd.methods.base import DistillMethod, match_groups
from dfakd.models import FeatureNet, NetFeatures


class FitNet(DistillMethod):
    """Hint learning: ``fitnet = weight * mean((regressor(relu(f_s)) - relu(f_t))^2)`` on the hint pair.

    Options: ``weight`` (RepDistiller's 100) and ``hint_group``, an index into the list of matched group
    pairs (``match_groups``); -1 picks the middle pair, ``len(pairs) // 2``.
    """

    name: ClassVar[str] = "fitnet"
    DEFAULTS: ClassVar[dict[str, Any]] = {"weight": 100.0, "hint_group": -1}
    BOUNDS: ClassVar[dict[str, tuple[float, bool]]] = {"weight": (0.0, True), "hint_group": (-1, True)}

    def __init__(self, teacher: FeatureNet, student: FeatureNet, options: dict[str, Any]) -> None:
        super().__init__(teacher, student, options)
        self.weight = float(self.options["weight"])
        pairs = match_groups(teacher, student)
        hint = self.options["hint_group"]
        if isinstance(hint, bool) or not isinstance(hint, int) or not -1 <= hint < len(pairs):
            raise DfakdError(
                f"option 'hint_group' of method 'fitnet' (config key 'distill.options.fitnet.hint_group') "
                f"must be -1 (the middle pair) or an integer in 0..{len(pairs) - 1} (the {len(pairs)} "
                f"teacher/student group pairs of the same spatial size), got {hint!r}"
            )
        pair = pairs[len(pairs) // 2 if hint == -1 else hint]
        self.teacher_group: int = pair.teacher.index
        self.student_group: int = pair.student.index
        self.regressor = nn.Sequential(
            nn.Conv2d(pair.student.channels, pair.teacher.channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(pair.teacher.channels),
            nn.ReLU(),
        )

    def forward(
        self, s: NetFeatures, t: NetFeatures, y: torch.Tensor, epoch: float
    ) -> dict[str, torch.Tensor]:
        """Return ``{"fitnet": weight * mean((regressor(relu(f_s)) - relu(f_t))^2)}``."""
        hint = F.relu(t.group_ends[self.teacher_group].detach())
        guided = self.regressor(F.relu(s.group_ends[self.student_group]))
        return {"fitnet": self.weight * F.mse_loss(guided, hint)}
