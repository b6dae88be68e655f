"""The feature interface that every model in the zoo implements, and the only thing the methods use.

A network is seen as a stem, an ordered list of *layer groups* (runs of blocks that share one spatial
size, METHOD.md section 1) and a head (pooling and classifier). For every group the model names its
*candidates*: the blocks/units whose outputs are aggregation candidates, in forward order, each with a
stable name (the module path of the block, e.g. ``layer2.3``). The last candidate of a group is the
*group-end* feature. All candidates of one group have one shape.

Every feature is the tensor *before* the activation that follows it (pre-ReLU, as in OFD). Models never
apply an in-place activation to a tensor they return as a feature.

- ``model(x)`` returns logits, like any classifier (community checkpoints load and run unchanged);
- ``model.forward_features(x)`` returns :class:`NetFeatures`, every candidate of every group and the
  logits, from one forward pass;
- ``model.forward_from(i, h)`` runs what follows group ``i`` (the activation the network applies to the
  group-end feature, the remaining groups and the head) on a pre-activation feature ``h`` shaped like
  group ``i``'s group-end feature. ``forward_from(i, feats.candidates[i][-1])`` equals ``feats.logits``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class NetFeatures:
    """Everything one forward pass collects."""

    candidates: list[list[torch.Tensor]]
    logits: torch.Tensor

    @property
    def group_ends(self) -> list[torch.Tensor]:
        return [group[-1] for group in self.candidates]


@dataclass(frozen=True)
class GroupInfo:
    """Static description of one layer group for a given input size."""

    index: int
    names: tuple[str, ...]
    channels: int
    spatial: int

    @property
    def end_name(self) -> str:
        return self.names[-1]


class Fp32Linear(nn.Linear):
    """The classifier, computed in fp32 even under bf16 autocast: the logits feed softmax-based losses
    (CE, KD, DKD), and bf16-rounded logits move a KL term by up to 15% (docs/BENCHMARKS.md). Same
    parameters and state_dict as ``nn.Linear``; the cost is one small matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def init_kaiming_fan_out(model: nn.Module) -> None:
    """RepDistiller's ResNet init: He-normal (fan-out) convs, BN weight 1 and bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def init_normal_fan_out(model: nn.Module, linear_std: float | None) -> None:
    """RepDistiller's VGG / MobileNetV2 / WRN init: convs N(0, 2 / fan_out) with zero bias, BN weight 1
    and bias 0, classifier bias 0 and weight N(0, linear_std) (left at PyTorch's default if None)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


class FeatureNet(nn.Module):
    """Base class of the zoo. Subclasses set ``group_names`` and implement the three forwards."""

    #: candidate names per group, in forward order; set by each subclass in ``__init__``
    group_names: list[list[str]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).logits

    def forward_features(self, x: torch.Tensor) -> NetFeatures:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_from(self, group_index: int, h: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    def candidate_names(self) -> list[str]:
        return [name for group in self.group_names for name in group]

    @torch.no_grad()
    def describe_groups(self, input_size: int = 32) -> list[GroupInfo]:
        """Channels and spatial size of each group, found with one dummy forward in eval mode."""
        was_training = self.training
        self.eval()
        try:
            param = next(self.parameters())
            x = torch.zeros(1, 3, input_size, input_size, device=param.device, dtype=param.dtype)
            feats = self.forward_features(x)
        finally:
            self.train(was_training)
        return [
            GroupInfo(index=i, names=tuple(names), channels=int(t[-1].shape[1]), spatial=int(t[-1].shape[-1]))
            for i, (names, t) in enumerate(zip(self.group_names, feats.candidates, strict=True))
        ]


class StagedNet(FeatureNet):
    """A stem, stages of units that each return their *pre-activation* output, and a head, with a ReLU
    between consecutive units (post-activation ResNets, ResNet50, ShuffleNet V1/V2). Subclasses define
    ``_stem`` (pre-activation output), ``_stages`` (one ``nn.Sequential`` per group) and ``_head``
    (applied to the activated output of the last unit)."""

    def _stem(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _stages(self) -> tuple[nn.Sequential, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _head(self, h: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _run(
        self, pre: torch.Tensor, start: int, candidates: list[list[torch.Tensor]] | None = None
    ) -> torch.Tensor:
        """Run the groups from ``start`` on a pre-activation input; collect each unit's pre-activation
        output into ``candidates`` when given; return the activated output of the last unit."""
        for stage in self._stages()[start:]:
            group = []
            for unit in stage:
                pre = unit(F.relu(pre))
                group.append(pre)
            if candidates is not None:
                candidates.append(group)
        return F.relu(pre)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._head(self._run(self._stem(x), 0))

    def forward_features(self, x: torch.Tensor) -> NetFeatures:
        candidates: list[list[torch.Tensor]] = []
        logits = self._head(self._run(self._stem(x), 0, candidates))
        return NetFeatures(candidates=candidates, logits=logits)

    def forward_from(self, group_index: int, h: torch.Tensor) -> torch.Tensor:
        return self._head(self._run(h, group_index + 1))
