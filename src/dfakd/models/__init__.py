"""The model zoo: CIFAR knowledge-distillation architectures with RepDistiller-identical state_dicts.

``build(name, num_classes)`` is the one entry point. Every model is a :class:`FeatureNet`
(see :mod:`dfakd.models.base` for the feature interface the methods use).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dfakd.errors import DfakdError
from dfakd.models import mobilenetv2, resnet, resnetv2, shufflenetv1, shufflenetv2, vgg, wrn
from dfakd.models.base import FeatureNet, Fp32Linear, GroupInfo, NetFeatures

__all__ = ["FeatureNet", "GroupInfo", "NetFeatures", "build", "available", "is_available"]

_FAMILIES = (resnet, wrn, vgg, resnetv2, mobilenetv2, shufflenetv1, shufflenetv2)


def _registry() -> dict[str, Callable[[int], FeatureNet]]:
    models: dict[str, Callable[[int], FeatureNet]] = {}
    for family in _FAMILIES:
        models.update(family.MODELS)
    return models


def available() -> list[str]:
    """Names of the fixed zoo (``wrn_D_W`` accepts any valid depth and width beyond those listed)."""
    return sorted(_registry())


def is_available(name: str) -> bool:
    return name in _registry() or wrn.parse_name(name) is not None


def build(name: str, num_classes: int) -> FeatureNet:
    """Build a zoo model by name, e.g. ``build('resnet32x4', 100)`` or ``build('wrn_28_4', 100)``."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise DfakdError(f"num_classes must be a positive integer, got {num_classes!r}")
    factory = _registry().get(name)
    wrn_spec = wrn.parse_name(name)
    if factory is not None:
        model = factory(num_classes)
    elif wrn_spec is not None:
        model = wrn.WideResNet(depth=wrn_spec[0], widen_factor=wrn_spec[1], num_classes=num_classes)
    else:
        raise DfakdError(f"unknown model {name!r}; available: {', '.join(available())} (and wrn_D_W)")
    for module in model.modules():  # the zoo's only Linear layers are its classifiers
        if type(module) is nn.Linear:
            module.__class__ = Fp32Linear
    return model
