"""ShuffleNetV2 for CIFAR, with the state_dicts of RepDistiller's ``ShuffleNetV2`` (CRD, ICLR 2020).

A 1x1 stem (24 channels, no downsampling), three stages (a stride-2 down-sampling unit followed by basic
units), then a 1x1 conv + BN + ReLU, average pooling and the classifier. At 32x32 input the stages run at
16, 8 and 4 px, one layer group each; every unit of a stage outputs the stage's channel count, so every
unit is a candidate.

RepDistiller's units apply a ReLU to each branch and then concatenate and channel-shuffle. Our units return
the same concatenation + shuffle of the *pre-ReLU* branches (the pre-activation feature), and the stage
applies the ReLU between units. The two are the same function: ReLU commutes with concatenation and
shuffling, and the pass-through half of a basic unit is the previous unit's (non-negative) output.

State_dict layout::

    conv1, bn1 (stem)
    layer{1,2,3}.0.{conv1: 3x3 dw s2, bn1, conv2: 1x1, bn2 | conv3: 1x1, bn3, conv4: 3x3 dw s2, bn4,
                    conv5: 1x1, bn5}                        (down-sampling unit: left | right branch)
    layer{1,2,3}.u.{conv1: 1x1, bn1, conv2: 3x3 dw, bn2, conv3: 1x1, bn3}        (basic units, u >= 1)
    conv2, bn2, linear (head)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from dfakd.models.base import FeatureNet, StagedNet
from dfakd.models.shufflenetv1 import channel_shuffle

__all__ = ["CONFIGS", "MODELS", "BasicUnit", "DownUnit", "ShuffleNetV2", "shuffle_v2"]

_STEM_CHANNELS = 24

#: RepDistiller's ``configs`` (net_size -> stage channels + head channels, basic units per stage)
CONFIGS: dict[float, dict[str, tuple[int, ...]]] = {
    0.5: {"out_channels": (48, 96, 192, 1024), "num_blocks": (3, 7, 3)},
    1: {"out_channels": (116, 232, 464, 1024), "num_blocks": (3, 7, 3)},
    1.5: {"out_channels": (176, 352, 704, 1024), "num_blocks": (3, 7, 3)},
    2: {"out_channels": (224, 488, 976, 2048), "num_blocks": (3, 7, 3)},
}


def _conv_bn(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, depthwise: bool = False
) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    groups = in_channels if depthwise else 1
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
    )
    return conv, nn.BatchNorm2d(out_channels)


class BasicUnit(nn.Module):
    """Split the channels in half; 1x1 -> 3x3 depthwise -> 1x1 on the second half; concat + shuffle.

    Returns the pre-activation output: the third conv's BN output is not rectified.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.split = channels // 2
        branch = channels - self.split
        self.conv1, self.bn1 = _conv_bn(branch, branch, 1)
        self.conv2, self.bn2 = _conv_bn(branch, branch, 3, depthwise=True)
        self.conv3, self.bn3 = _conv_bn(branch, branch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[:, : self.split], x[:, self.split :]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = self.bn3(self.conv3(out))
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class DownUnit(nn.Module):
    """Two stride-2 branches on the full input (left: dw -> 1x1; right: 1x1 -> dw -> 1x1); concat + shuffle.

    Returns the pre-activation output: neither branch's last BN output is rectified.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid_channels = out_channels // 2
        # left branch
        self.conv1, self.bn1 = _conv_bn(in_channels, in_channels, 3, stride=2, depthwise=True)
        self.conv2, self.bn2 = _conv_bn(in_channels, mid_channels, 1)
        # right branch
        self.conv3, self.bn3 = _conv_bn(in_channels, mid_channels, 1)
        self.conv4, self.bn4 = _conv_bn(mid_channels, mid_channels, 3, stride=2, depthwise=True)
        self.conv5, self.bn5 = _conv_bn(mid_channels, mid_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.bn1(self.conv1(x))
        left = self.bn2(self.conv2(left))
        right = F.relu(self.bn3(self.conv3(x)))
        right = self.bn4(self.conv4(right))
        right = self.bn5(self.conv5(right))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(StagedNet):
    """RepDistiller's CIFAR ShuffleNetV2 behind the feature interface; each stage is one layer group."""

    def __init__(self, net_size: float = 1, num_classes: int = 100) -> None:
        super().__init__()
        if net_size not in CONFIGS:
            raise ValueError(f"net_size must be one of {sorted(CONFIGS)}, got {net_size!r}")
        out_channels = CONFIGS[net_size]["out_channels"]
        num_blocks = CONFIGS[net_size]["num_blocks"]

        self.conv1 = nn.Conv2d(3, _STEM_CHANNELS, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM_CHANNELS)
        in_channels = _STEM_CHANNELS
        stages = []
        for stage_channels, n in zip(out_channels[:3], num_blocks, strict=True):
            units: list[nn.Module] = [DownUnit(in_channels, stage_channels)]
            units += [BasicUnit(stage_channels) for _ in range(n)]
            stages.append(nn.Sequential(*units))
            in_channels = stage_channels
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)
        self.group_names = [
            [f"layer{i + 1}.{u}" for u in range(len(stage))] for i, stage in enumerate(self._stages())
        ]

    def _stages(self) -> tuple[nn.Sequential, ...]:
        return (self.layer1, self.layer2, self.layer3)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn2(self.conv2(h)))
        return self.linear(F.avg_pool2d(h, 4).flatten(1))

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv1(x))


def shuffle_v2(num_classes: int, net_size: float = 1) -> ShuffleNetV2:
    """RepDistiller's ``ShuffleNetV2(net_size)``; ``ShuffleV2`` is net_size 1."""
    return ShuffleNetV2(net_size=net_size, num_classes=num_classes)


MODELS: dict[str, Callable[[int], FeatureNet]] = {
    "ShuffleV2": shuffle_v2,
    **{f"ShuffleV2_{size:.1f}": partial(shuffle_v2, net_size=size) for size in CONFIGS},
}
