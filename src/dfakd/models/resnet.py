"""CIFAR ResNets (He et al. 2016) as defined in RepDistiller (CRD, ICLR 2020) ``models/resnet.py``.

Module names, layer order, channels, strides and bias flags follow RepDistiller, so that its published
checkpoints (``torch.load(f)['model']``) load with ``strict=True``:

- stem ``conv1`` (3x3, no bias) + ``bn1``; three stages ``layer1`` (32 px), ``layer2`` (16 px),
  ``layer3`` (8 px) of ``(depth - 2) / 6`` post-activation :class:`BasicBlock` each; ``fc``;
- a block whose stride or channel count changes has ``downsample`` = 1x1 conv (no bias) + BN.

Feature interface: one group per stage; every block is a candidate, its feature is the residual sum
before the final ReLU (RepDistiller's ``preact``). The network is written with the ReLU applied where
a feature is consumed, so the blocks themselves return pre-activation tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfakd.models.base import FeatureNet, StagedNet, init_kaiming_fan_out

__all__ = ["BasicBlock", "CifarResNet", "MODELS"]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """Average over the whole map with ``avg_pool2d`` (RepDistiller's ``AvgPool2d(8)`` at 8x8, bit for bit;
    ``adaptive_avg_pool2d`` rounds differently), flattened to ``(N, C)``."""
    return torch.flatten(F.avg_pool2d(x, kernel_size=x.shape[-2:]), 1)


class BasicBlock(nn.Module):
    """Post-activation basic block; ``forward`` returns the residual sum *before* the final ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return out


class CifarResNet(StagedNet):
    """CIFAR ResNet of depth ``6n + 2``; ``widths`` = (stem, layer1, layer2, layer3) channels."""

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        if len(widths) != 4:
            raise ValueError(f"widths must give (stem, layer1, layer2, layer3) channels, got {widths}")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_layer(widths[0], widths[1], n, stride=1)
        self.layer2 = self._make_layer(widths[1], widths[2], n, stride=2)
        self.layer3 = self._make_layer(widths[2], widths[3], n, stride=2)
        self.fc = nn.Linear(widths[3], num_classes)
        self.group_names = [[f"{stage}.{j}" for j in range(n)] for stage in ("layer1", "layer2", "layer3")]

        init_kaiming_fan_out(self)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _stages(self) -> tuple[nn.Sequential, ...]:
        return (self.layer1, self.layer2, self.layer3)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv1(x))

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(global_avg_pool(h))


def _factory(depth: int, widths: tuple[int, int, int, int]) -> Callable[[int], CifarResNet]:
    def build(num_classes: int) -> CifarResNet:
        return CifarResNet(depth, widths, num_classes)

    return build


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)

resnet8 = _factory(8, _NARROW)
resnet14 = _factory(14, _NARROW)
resnet20 = _factory(20, _NARROW)
resnet32 = _factory(32, _NARROW)
resnet44 = _factory(44, _NARROW)
resnet56 = _factory(56, _NARROW)
resnet110 = _factory(110, _NARROW)
resnet8x4 = _factory(8, _WIDE)
resnet32x4 = _factory(32, _WIDE)

MODELS: dict[str, Callable[[int], FeatureNet]] = {
    "resnet8": resnet8,
    "resnet14": resnet14,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
}
