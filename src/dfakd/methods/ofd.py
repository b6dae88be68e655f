"""Feature distillation against (aggregated) teacher features with OFD's loss (Heo et al., ICCV 2019).

For every matched group i (METHOD.md section 4)::

    s_i = BN(conv1x1(S_i))                    # connector on the student's pre-ReLU group-end feature
    t_i = max(A_i, m_i)                       # margin-ReLU of the aggregated teacher feature
    d_i = sum((s_i - t_i)^2 * [(s_i > t_i) or (t_i > 0)])      # partial L2
    L = weight / batch * sum_i d_i / 2^(G - 1 - i)

``A_i = sum_j w_ij T_i^j`` with the fixed weights of an aggregation; ``ofd`` is the ``last`` aggregation
(the group-end feature alone), ``dfa`` reads a derived aggregation file. The margin m_i is, per channel,
the mean of the negative values of A_i over the training data (for a single BN output this is OFD's
closed form E[x | x < 0] from the BN's affine parameters); a channel with (almost) no negative values gets
``-margin_fallback_std`` standard deviations, as OFD does.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from dfakd.errors import DfakdError
from dfakd.methods import aggregation as agg_mod
from dfakd.methods.base import DistillContext, DistillMethod, match_groups
from dfakd.models import FeatureNet, NetFeatures


def connector(in_channels: int, out_channels: int) -> nn.Sequential:
    """OFD's connector: 1x1 conv + BN, initialized as in OFD (He-normal conv, BN weight 1, bias 0)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
    bn = nn.BatchNorm2d(out_channels)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, bn)


def partial_l2(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum of squared differences, skipping positions where the student is already below a non-positive
    target (those are 'off' in the teacher and need not be matched exactly)."""
    mask = (student > target) | (target > 0)
    return ((student - target).pow(2) * mask).sum()


class MarginStats:
    """Running per-channel sums for the margin E[x | x < 0] and the fallback std."""

    def __init__(self, channels: int, device: torch.device) -> None:
        z = lambda: torch.zeros(channels, dtype=torch.float64, device=device)  # noqa: E731
        self.neg_sum, self.neg_count, self.total, self.sum, self.sq_sum = z(), z(), z(), z(), z()

    def update(self, a: torch.Tensor) -> None:
        a = a.detach().double().transpose(0, 1).flatten(1)  # channels x positions
        neg = a.clamp(max=0)
        self.neg_sum += neg.sum(1)
        self.neg_count += (a < 0).sum(1)
        self.total += a.shape[1]
        self.sum += a.sum(1)
        self.sq_sum += a.pow(2).sum(1)

    def margin(self, fallback_std: float, min_fraction: float = 1e-3) -> torch.Tensor:
        mean = self.sum / self.total
        std = (self.sq_sum / self.total - mean.pow(2)).clamp(min=0).sqrt()
        conditional = self.neg_sum / self.neg_count.clamp(min=1)
        rare = self.neg_count / self.total <= min_fraction
        return torch.where(rare, -fallback_std * std, conditional).float()


class AggregatedFeatureDistill(DistillMethod):
    """OFD's loss against the aggregated teacher features of a fixed aggregation (shared by dfa and ofd)."""

    DEFAULTS: ClassVar[dict[str, Any]] = {
        "weight": 1.0e-3,  # OFD: loss.sum() / batch / 1000
        "group_decay": 2.0,  # group i weighted 1 / decay^(G-1-i)
        "margin_fallback_std": 3.0,
        "margin_batches": 0,  # training batches for the margin estimate; 0 = the whole training set
    }
    BOUNDS: ClassVar[dict[str, tuple[float, bool]]] = {
        "weight": (0.0, True),
        "group_decay": (0.0, False),
        "margin_fallback_std": (0.0, True),
        "margin_batches": (0, True),
    }

    def __init__(
        self,
        teacher: FeatureNet,
        student: FeatureNet,
        options: dict[str, Any],
        aggregation: agg_mod.Aggregation,
    ) -> None:
        super().__init__(teacher, student, options)
        self.pairs = match_groups(teacher, student)
        self.aggregation = aggregation
        self.connectors = nn.ModuleList(connector(p.student.channels, p.teacher.channels) for p in self.pairs)
        for i, p in enumerate(self.pairs):
            self.register_buffer(f"weights_{i}", aggregation.weight_vector(p.teacher.names, p.spatial))
            self.register_buffer(f"margin_{i}", torch.zeros(p.teacher.channels))
        # the same fixed weights as Python floats: a training step reads them without a device sync
        self.weight_lists = [getattr(self, f"weights_{i}").tolist() for i in range(len(self.pairs))]

    def settings(self) -> dict[str, Any]:
        weights = {
            f"distill.aggregation.g{g.spatial}.{layer}": weight
            for g in self.aggregation.groups
            for layer, weight in g.layers.items()
        }
        return {**super().settings(), **weights}

    def target(self, t: NetFeatures, i: int) -> torch.Tensor:
        return agg_mod.aggregate(t.candidates[self.pairs[i].teacher.index], self.weight_lists[i])

    @torch.no_grad()
    def prepare(self, teacher: FeatureNet, batches) -> None:
        device = next(teacher.parameters()).device
        stats = [MarginStats(p.teacher.channels, device) for p in self.pairs]
        limit = self.options["margin_batches"]
        was_training = teacher.training
        teacher.eval()
        for b, (x, _) in enumerate(batches):
            if limit and b >= limit:
                break
            t = teacher.forward_features(x)
            for i, s in enumerate(stats):
                s.update(self.target(t, i).float())
        teacher.train(was_training)
        for i, s in enumerate(stats):
            getattr(self, f"margin_{i}").copy_(s.margin(self.options["margin_fallback_std"]))

    def mapped_and_target(self, s: NetFeatures, t: NetFeatures, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Group i's connector output ``s_i`` and its margin-ReLU target ``t_i`` (float32)."""
        student = self.connectors[i](s.candidates[self.pairs[i].student.index][-1])
        margin = getattr(self, f"margin_{i}").view(1, -1, 1, 1)
        return student.float(), torch.max(self.target(t, i).detach().float(), margin)

    def group_term(self, mapped: torch.Tensor, target: torch.Tensor, i: int, batch: int) -> torch.Tensor:
        """Group i's share of the loss from its ``mapped_and_target``, weighted as in the loss."""
        decay = self.options["group_decay"] ** (len(self.pairs) - 1 - i)
        return self.options["weight"] / batch * partial_l2(mapped, target) / decay

    def group_terms(self, s: NetFeatures, t: NetFeatures, batch: int) -> list[torch.Tensor]:
        """Each group's share of the loss, weighted as in it (the loss is their sum)."""
        return [self.group_term(*self.mapped_and_target(s, t, i), i, batch) for i in range(len(self.pairs))]

    def forward(
        self, s: NetFeatures, t: NetFeatures, y: torch.Tensor, epoch: float
    ) -> dict[str, torch.Tensor]:
        return {self.name: sum(self.group_terms(s, t, y.shape[0]))}


class OFD(AggregatedFeatureDistill):
    """Overhaul of Feature Distillation: the group-end teacher features (the ``last`` aggregation)."""

    name = "ofd"

    @classmethod
    def from_config(cls, teacher, student, options, context: DistillContext) -> OFD:
        last = agg_mod.fixed(context.teacher_arch, match_groups(teacher, student), "last")
        return cls(teacher, student, options, last)


class DFA(AggregatedFeatureDistill):
    """DFA stage 2: OFD's loss against the searched (derived) aggregation of teacher layers."""

    name = "dfa"

    @classmethod
    def from_config(cls, teacher, student, options, context: DistillContext) -> DFA:
        path = context.aggregation
        if not path:
            raise DfakdError(
                "method 'dfa' needs an aggregation file: set distill.aggregation or --aggregation"
            )
        agg = agg_mod.load(path)
        agg_mod.check_against(agg, context.teacher_arch, teacher, match_groups(teacher, student), str(path))
        return cls(teacher, student, options, agg)
