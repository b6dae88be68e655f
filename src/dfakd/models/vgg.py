"""VGG with BatchNorm for CIFAR, as RepDistiller's (CRD, ICLR 2020) ``models/vgg.py`` ``vgg*_bn``.

Module names, layer order, channels and bias flags follow RepDistiller, so that its published checkpoints
(``torch.load(f)['model']``) load with ``strict=True``:

- five blocks ``block0`` .. ``block4``, each a ``Sequential`` of (3x3 conv *with* bias, BN, ReLU) per
  layer with the block's last ReLU dropped (it is applied outside), so BN indices are 1, 4, 7, ...;
- 2x2 max pools between blocks; the pool between ``block3`` and ``block4`` is applied only to 64 px
  inputs (RepDistiller's rule), so at 32 px ``block3`` and ``block4`` both run at 4 px; then global
  average pooling and ``classifier`` (512 -> classes). No fully connected hidden layers.

Feature interface: one group per spatial size at 32 px input: ``block0`` (32 px), ``block1`` (16),
``block2`` (8), ``block3`` + ``block4`` (4). Every conv layer is a candidate; its feature is its BN output
(pre-ReLU), named by the BN's module path (``block0.1``, ``block0.4``, ...). The ReLUs inside the blocks
are not in place, so these tensors survive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfakd.errors import DfakdError
from dfakd.models.base import FeatureNet, NetFeatures, init_normal_fan_out

__all__ = ["VGG", "MODELS"]

#: conv widths per block (RepDistiller's cfg 'S', 'A', 'B', 'D', 'E')
CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}

#: the blocks of each layer group at 32 px input (RepDistiller skips the pool after block3 there)
_GROUPS: tuple[tuple[int, ...], ...] = ((0,), (1,), (2,), (3, 4))

#: the only input size at which RepDistiller pools between block3 and block4 (Tiny-ImageNet)
_POOL3_INPUT_SIZE = 64


def _make_block(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(FeatureNet):
    """VGG-BN for 32x32 inputs; ``config`` gives the conv widths of the five blocks."""

    def __init__(self, config: Sequence[Sequence[int]], num_classes: int) -> None:
        super().__init__()
        if len(config) != 5 or config[4][-1] != 512:
            raise ValueError(f"VGG config must have five blocks ending in 512 channels, got {config}")
        in_channels = [3] + [widths[-1] for widths in config[:-1]]
        self.block0 = _make_block(in_channels[0], config[0])
        self.block1 = _make_block(in_channels[1], config[1])
        self.block2 = _make_block(in_channels[2], config[2])
        self.block3 = _make_block(in_channels[3], config[3])
        self.block4 = _make_block(in_channels[4], config[4])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)
        self.group_names = [
            [f"block{b}.{3 * j + 1}" for b in blocks for j in range(len(config[b]))] for blocks in _GROUPS
        ]

        init_normal_fan_out(self, linear_std=0.01)

    def _blocks(self) -> tuple[nn.Sequential, ...]:
        return (self.block0, self.block1, self.block2, self.block3, self.block4)

    def _pool_before(self, block_index: int, pool3: bool) -> nn.Module | None:
        """The max pool applied to the (activated) input of a block, or None."""
        if block_index == 0 or (block_index == 4 and not pool3):
            return None
        return (self.pool0, self.pool1, self.pool2, self.pool3)[block_index - 1]

    @staticmethod
    def _run_block(block: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
        """The BN outputs (pre-ReLU) of every conv layer of a block; the last is the block output."""
        outs = []
        for layer in block:
            x = layer(x)
            if isinstance(layer, nn.BatchNorm2d):
                outs.append(x)
        return outs

    def _run_groups(
        self, start: int, h: torch.Tensor, pool3: bool = False
    ) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """Run groups ``start``.. on ``h`` (the image for group 0, else the pre-activation group-end
        feature of group ``start - 1``); returns the last pre-activation and each group's candidates."""
        candidates = []
        for blocks in _GROUPS[start:]:
            group: list[torch.Tensor] = []
            for b in blocks:
                x = h if b == 0 else F.relu(h)
                pool = self._pool_before(b, pool3)
                if pool is not None:
                    x = pool(x)
                group += self._run_block(self._blocks()[b], x)
                h = group[-1]
            candidates.append(group)
        return h, candidates

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool4(F.relu(h)), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # RepDistiller's forward, including its pool3 at 64 px (where the feature interface is undefined)
        h, _ = self._run_groups(0, x, pool3=x.shape[2] == _POOL3_INPUT_SIZE)
        return self._head(h)

    def forward_features(self, x: torch.Tensor) -> NetFeatures:
        if x.shape[2] == _POOL3_INPUT_SIZE:
            raise DfakdError(
                f"VGG feature groups are undefined for {_POOL3_INPUT_SIZE} px inputs: RepDistiller pools "
                "between block3 and block4 only at that size, which splits their layer group"
            )
        h, candidates = self._run_groups(0, x)
        return NetFeatures(candidates=candidates, logits=self._head(h))

    def forward_from(self, group_index: int, h: torch.Tensor) -> torch.Tensor:
        h, _ = self._run_groups(group_index + 1, h)
        return self._head(h)


def _factory(config: list[list[int]]) -> Callable[[int], VGG]:
    def build(num_classes: int) -> VGG:
        return VGG(config, num_classes)

    return build


vgg8 = _factory(CONFIGS["vgg8"])
vgg11 = _factory(CONFIGS["vgg11"])
vgg13 = _factory(CONFIGS["vgg13"])
vgg16 = _factory(CONFIGS["vgg16"])
vgg19 = _factory(CONFIGS["vgg19"])

MODELS: dict[str, Callable[[int], FeatureNet]] = {
    "vgg8": vgg8,
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "vgg19": vgg19,
}
