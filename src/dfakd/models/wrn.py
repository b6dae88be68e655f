"""Wide ResNets (Zagoruyko & Komodakis 2016) as defined in RepDistiller (CRD, ICLR 2020) ``models/wrn.py``.

Module names, layer order, channels, strides and bias flags follow RepDistiller, so that its published
checkpoints (``torch.load(f)['model']``) load with ``strict=True``:

- stem ``conv1`` (3x3, 16 channels, no bias); three stages ``block1`` (32 px), ``block2`` (16 px),
  ``block3`` (8 px), each a ``layer`` of ``(depth - 4) / 6`` pre-activation :class:`BasicBlock`; the final
  ``bn1`` and ``fc``;
- a block whose channel count changes has ``convShortcut`` (1x1, no bias) applied to ``relu(bn1(x))``;
  a block that keeps it adds the raw input ``x``.

Feature interface (OFD's convention for pre-activation nets): one group per stage, every block is a
candidate, and its pre-ReLU feature is the BN that the *next* block (or the final ``bn1``) applies to the
block's output. The network computes that BN once and hands it to the next block, which is why
:meth:`BasicBlock.forward` takes both the raw input and its normalized form.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dfakd.models.base import FeatureNet, NetFeatures, init_normal_fan_out
from dfakd.models.resnet import global_avg_pool

__all__ = ["BasicBlock", "NetworkBlock", "WideResNet", "parse_name", "MODELS"]

_NAME = re.compile(r"wrn_([1-9][0-9]*)_([1-9][0-9]*)")


def parse_name(name: str) -> tuple[int, int] | None:
    """``'wrn_40_2'`` -> ``(40, 2)``; None unless the name is ``wrn_D_W`` with D = 6n + 4 (n >= 1), W >= 1."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    depth, width = int(match.group(1)), int(match.group(2))
    if depth < 10 or (depth - 4) % 6 != 0:
        return None
    return depth, width


class BasicBlock(nn.Module):
    """Pre-activation block: ``relu(bn1(x))`` -> conv1 -> bn2 -> relu -> (dropout) -> conv2, plus shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut: nn.Conv2d | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor | None, x_bn: torch.Tensor) -> torch.Tensor:
        """``x_bn`` is ``self.bn1(x)``, computed by the caller; the raw ``x`` is only read when the block
        keeps its channel count (identity shortcut), so it may be None otherwise."""
        a = F.relu(x_bn)
        out = F.relu(self.bn2(self.conv1(a)), inplace=True)
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        if self.convShortcut is not None:
            return self.convShortcut(a) + out
        if x is None:
            raise ValueError("a block with an identity shortcut needs its raw input x")
        return x + out


class NetworkBlock(nn.Module):
    """One stage: a ``layer`` of ``num_layers`` blocks, the first with the stage's stride."""

    def __init__(
        self, num_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        blocks = [BasicBlock(in_planes, out_planes, stride, drop_rate)]
        blocks += [BasicBlock(out_planes, out_planes, 1, drop_rate) for _ in range(1, num_layers)]
        self.layer = nn.Sequential(*blocks)


class WideResNet(FeatureNet):
    """WRN-``depth``-``widen_factor`` for 32x32 inputs (stage widths 16, 16k, 32k, 64k)."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"WRN widen_factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        self.group_names = [
            [f"{stage}.layer.{j}" for j in range(n)] for stage in ("block1", "block2", "block3")
        ]

        init_normal_fan_out(self, linear_std=None)

    def _stages(self) -> tuple[nn.Sequential, ...]:
        return (self.block1.layer, self.block2.layer, self.block3.layer)

    def _output_bns(self, stage_index: int) -> list[nn.BatchNorm2d]:
        """The BN applied to each block output of a stage: the next block's ``bn1``, or the final ``bn1``."""
        stages = self._stages()
        following = stages[stage_index + 1][0].bn1 if stage_index + 1 < len(stages) else self.bn1
        return [block.bn1 for block in stages[stage_index][1:]] + [following]

    def _run_stage(
        self, stage_index: int, x: torch.Tensor | None, x_bn: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run a stage on its raw input ``x`` and ``x_bn`` = its first block's ``bn1(x)``; returns the raw
        stage output and the pre-ReLU candidates (each block output through the BN that follows it)."""
        candidates = []
        for block, bn in zip(self._stages()[stage_index], self._output_bns(stage_index), strict=True):
            x = block(x, x_bn)
            x_bn = bn(x)
            candidates.append(x_bn)
        assert x is not None
        return x, candidates

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(global_avg_pool(F.relu(h)))

    def forward_features(self, x: torch.Tensor) -> NetFeatures:
        out = self.conv1(x)
        out_bn = self.block1.layer[0].bn1(out)
        candidates = []
        for i in range(len(self._stages())):
            out, group = self._run_stage(i, out, out_bn)
            candidates.append(group)
            out_bn = group[-1]
        return NetFeatures(candidates=candidates, logits=self._head(out_bn))

    def forward_from(self, group_index: int, h: torch.Tensor) -> torch.Tensor:
        # ``h`` is the next stage's first bn1 applied to the raw group-end output; that block changes the
        # channel count, so it reads only relu(h) and the raw output is not needed.
        for i in range(group_index + 1, len(self._stages())):
            _, group = self._run_stage(i, None, h)
            h = group[-1]
        return self._head(h)


def _factory(depth: int, widen_factor: int) -> Callable[[int], WideResNet]:
    def build(num_classes: int) -> WideResNet:
        return WideResNet(depth, widen_factor, num_classes)

    return build


MODELS: dict[str, Callable[[int], FeatureNet]] = {
    f"wrn_{d}_{w}": _factory(d, w) for d, w in [(16, 1), (16, 2), (16, 4), (28, 2), (28, 4), (40, 1), (40, 2)]
}
