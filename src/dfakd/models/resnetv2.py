"""The CIFAR ResNet50 of RepDistiller (CRD, ICLR 2020) ``models/resnetv2.py`` (ImageNet widths, 3x3 stem).

Module names, layer order, channels, strides and bias flags follow RepDistiller, so that its published
checkpoints (``torch.load(f)['model']``) load with ``strict=True``:

- stem ``conv1`` (3x3, stride 1, 64 channels, no bias) + ``bn1``, no max pool; four stages ``layer1`` ..
  ``layer4`` (64, 128, 256, 512 planes; 32, 16, 8, 4 px) of post-activation :class:`Bottleneck` blocks
  (expansion 4); global average pooling and ``linear``;
- a block whose stride or channel count changes has ``shortcut`` = 1x1 conv (no bias) + BN, otherwise an
  empty ``shortcut`` (no state_dict entries).

Feature interface: one group per stage; every block is a candidate, its feature is the residual sum
before the final ReLU. As in :mod:`dfakd.models.resnet`, the ReLU is applied where a feature is consumed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfakd.models.base import FeatureNet, StagedNet, init_kaiming_fan_out

__all__ = ["Bottleneck", "ResNet", "MODELS"]


class Bottleneck(nn.Module):
    """Post-activation bottleneck; ``forward`` returns the residual sum *before* the final ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        out += self.shortcut(x)
        return out


class ResNet(StagedNet):
    """RepDistiller's CIFAR ResNet with bottleneck blocks; ``num_blocks`` per stage."""

    def __init__(self, num_blocks: Sequence[int], num_classes: int) -> None:
        super().__init__()
        if len(num_blocks) != 4 or min(num_blocks) < 1:
            raise ValueError(f"num_blocks must give four positive block counts, got {num_blocks}")
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(256, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(512, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(1024, 512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512 * Bottleneck.expansion, num_classes)
        self.group_names = [[f"layer{i + 1}.{j}" for j in range(n)] for i, n in enumerate(num_blocks)]

        init_kaiming_fan_out(self)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [Bottleneck(in_planes, planes, stride)]
        layers += [Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _stages(self) -> tuple[nn.Sequential, ...]:
        return (self.layer1, self.layer2, self.layer3, self.layer4)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv1(x))

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.avgpool(h), 1))


def ResNet50(num_classes: int) -> ResNet:  # RepDistiller's (and CRD's registry) name
    return ResNet((3, 4, 6, 3), num_classes)


MODELS: dict[str, Callable[[int], FeatureNet]] = {"ResNet50": ResNet50}
