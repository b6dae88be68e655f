"""ShuffleNet (v1) for CIFAR, with the state_dict of RepDistiller's ``ShuffleV1`` (CRD, ICLR 2020).

A 1x1 stem (24 channels, no downsampling) followed by three stages of bottleneck units; the first unit of
each stage has stride 2 and concatenates its branch with an average-pooled shortcut, the others add an
identity shortcut. At 32x32 input the stages run at 16, 8 and 4 px, one layer group each, and every unit
of a stage outputs the stage's channel count, so every unit is a candidate.

A unit's candidate feature is its pre-activation (the concatenation or sum, before the final ReLU); the
stage applies the ReLU between units, and ``forward_from`` applies it to the group-end feature.

State_dict layout::

    conv1, bn1 (stem)
    layer{1,2,3}.u.{conv1: grouped 1x1, bn1, conv2: 3x3 depthwise, bn2, conv3: grouped 1x1, bn3}
    linear
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dfakd.models.base import FeatureNet, StagedNet

__all__ = ["MODELS", "Bottleneck", "ShuffleNetV1", "channel_shuffle"]

_STEM_CHANNELS = 24


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, g*k, H, W] -> [N, k*g, H, W]: interleave the channels of the ``groups`` groups."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    """Grouped 1x1 -> shuffle -> 3x3 depthwise -> grouped 1x1; returns the pre-ReLU output.

    With stride 2 the branch produces ``out_channels`` channels and is concatenated with the
    average-pooled input (so the unit outputs ``out_channels + in_channels``); with stride 1 it is added to
    the input.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid_channels = out_channels // 4
        # RepDistiller: the unit reading the 24-channel stem uses a dense first 1x1 conv
        self.shuffle_groups = 1 if in_channels == _STEM_CHANNELS else groups
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 1, groups=self.shuffle_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.conv2 = nn.Conv2d(
            mid_channels, mid_channels, 3, stride=stride, padding=1, groups=mid_channels, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv3 = nn.Conv2d(mid_channels, out_channels, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.shuffle_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = self.shortcut(x)
        return torch.cat([out, shortcut], 1) if self.stride == 2 else out + shortcut


class ShuffleNetV1(StagedNet):
    """RepDistiller's CIFAR ShuffleNet behind the feature interface; each stage is one layer group."""

    def __init__(
        self,
        out_channels: tuple[int, int, int],
        num_blocks: tuple[int, int, int],
        groups: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, _STEM_CHANNELS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM_CHANNELS)
        in_channels = _STEM_CHANNELS
        stages = []
        for stage_channels, n in zip(out_channels, num_blocks, strict=True):
            # the stride-2 unit concatenates its input, so its branch makes only the remaining channels
            units = [Bottleneck(in_channels, stage_channels - in_channels, stride=2, groups=groups)]
            units += [
                Bottleneck(stage_channels, stage_channels, stride=1, groups=groups) for _ in range(n - 1)
            ]
            stages.append(nn.Sequential(*units))
            in_channels = stage_channels
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(out_channels[2], num_classes)
        self.group_names = [
            [f"layer{i + 1}.{u}" for u in range(len(stage))] for i, stage in enumerate(self._stages())
        ]

    def _stages(self) -> tuple[nn.Sequential, ...]:
        return (self.layer1, self.layer2, self.layer3)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(F.avg_pool2d(h, 4).flatten(1))

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv1(x))


def shuffle_v1(num_classes: int) -> ShuffleNetV1:
    """RepDistiller's ``ShuffleV1``: 240/480/960 channels, 4/8/4 units, 3 groups."""
    return ShuffleNetV1(out_channels=(240, 480, 960), num_blocks=(4, 8, 4), groups=3, num_classes=num_classes)


MODELS: dict[str, Callable[[int], FeatureNet]] = {"ShuffleV1": shuffle_v1}
