"""MobileNetV2 for CIFAR, with the state_dict of RepDistiller's ``mobile_half`` (CRD, ICLR 2020).

RepDistiller's CIFAR MobileNetV2 (from "Knowledge Distillation via Route Constrained Optimization") is the
ImageNet layout with a stride-2 stem, expansion ``T`` and width multiplier ``W``; ``mobile_half`` is
``T=6, W=0.5``. The classifier width stays 1280 for ``W <= 1``. At 32x32 input the stem halves the
resolution and stages 3, 4 and 6 (1-based) halve it again, so the blocks fall into four layer groups at
16, 8, 4 and 2 px. Where the channel count changes inside a group (stages 1-2, 4-5, 6-7) the candidates
are the blocks of the group's last stage, the ones whose output has the group-end shape.

Inverted residual blocks are linear (no activation after the projection), so a block's output is itself
the pre-activation feature, and the activation between groups is the identity. The final 1x1 conv to 1280
channels belongs to the head.

State_dict layout (``blocks.s.b`` = block ``b`` of stage ``s``)::

    conv1.{0: conv 3x3 s2, 1: bn}
    blocks.s.b.conv.{0: 1x1 expand, 1: bn, 3: 3x3 depthwise, 4: bn, 6: 1x1 project, 7: bn}
    conv2.{0: conv 1x1, 1: bn}
    classifier.0 (linear)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dfakd.models.base import FeatureNet, NetFeatures, init_normal_fan_out

__all__ = ["MODELS", "InvertedResidual", "MobileNetV2", "mobile_half"]


def _stage_settings(expansion: int) -> list[tuple[int, int, int, int]]:
    """(expansion ratio, output channels at width 1, number of blocks, stride of the first block)."""
    return [
        (1, 16, 1, 1),
        (expansion, 24, 2, 1),
        (expansion, 32, 3, 2),
        (expansion, 64, 4, 2),
        (expansion, 96, 3, 1),
        (expansion, 160, 3, 2),
        (expansion, 320, 1, 1),
    ]


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection, plus identity when the shapes allow it."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(FeatureNet):
    """RepDistiller's CIFAR MobileNetV2 (``mobilenetv2_T_w``) behind the feature interface."""

    def __init__(
        self, num_classes: int = 100, expansion: int = 6, width_mult: float = 0.5, input_size: int = 32
    ) -> None:
        super().__init__()
        if input_size % 32 != 0:
            raise ValueError(f"input_size must be a multiple of 32, got {input_size}")
        settings = _stage_settings(expansion)

        channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, channels, 3, stride=2)

        self.blocks = nn.ModuleList()
        for t, c, n, s in settings:
            out_channels = int(c * width_mult)
            stage = []
            for stride in [s] + [1] * (n - 1):
                stage.append(InvertedResidual(channels, out_channels, stride, t))
                channels = out_channels
            self.blocks.append(nn.Sequential(*stage))

        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channels, self.last_channel, 1, stride=1)
        self.avgpool = nn.AvgPool2d(input_size // 16, ceil_mode=True)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))

        # a layer group starts at every downsampling stage; its candidates are its last stage's blocks
        self._group_stages: list[list[int]] = []
        for index, (_, _, _, stride) in enumerate(settings):
            if stride == 2 or not self._group_stages:
                self._group_stages.append([])
            self._group_stages[-1].append(index)
        self.group_names = [
            [f"blocks.{stages[-1]}.{b}" for b in range(len(self.blocks[stages[-1]]))]
            for stages in self._group_stages
        ]
        init_normal_fan_out(self, linear_std=0.01)

    def _run_groups(
        self, h: torch.Tensor, start: int, candidates: list[list[torch.Tensor]] | None = None
    ) -> torch.Tensor:
        """Run groups ``start..`` on ``h``; append each group's candidates to ``candidates`` if given."""
        for stages in self._group_stages[start:]:
            for index in stages[:-1]:
                h = self.blocks[index](h)
            if candidates is not None:
                candidates.append([])
            for block in self.blocks[stages[-1]]:
                h = block(h)
                if candidates is not None:
                    candidates[-1].append(h)
        return h

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        h = self.avgpool(self.conv2(h))
        return self.classifier(h.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._head(self._run_groups(self.conv1(x), 0))

    def forward_features(self, x: torch.Tensor) -> NetFeatures:
        candidates: list[list[torch.Tensor]] = []
        logits = self._head(self._run_groups(self.conv1(x), 0, candidates))
        return NetFeatures(candidates=candidates, logits=logits)

    def forward_from(self, group_index: int, h: torch.Tensor) -> torch.Tensor:
        # the blocks are linear: no activation follows a group-end feature
        return self._head(self._run_groups(h, group_index + 1))


def mobile_half(num_classes: int) -> MobileNetV2:
    """RepDistiller's ``mobile_half``: expansion 6, width 0.5."""
    return MobileNetV2(num_classes=num_classes, expansion=6, width_mult=0.5)


MODELS: dict[str, Callable[[int], FeatureNet]] = {"MobileNetV2": mobile_half}
