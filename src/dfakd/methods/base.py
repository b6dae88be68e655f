"""The interface every distillation method implements (one small class per method, one file each).

A distillation step runs the teacher once (``forward_features`` under ``no_grad``) and the student once,
then asks each configured method for its loss terms::

    t = teacher.forward_features(x)        # one teacher forward feeds every method
    s = student.forward_features(x)
    loss = ce_weight * CE(s.logits, y) + sum(method(s, t, y, epoch) for method in methods)

A method is an ``nn.Module``: its own trainable parts (connectors, regressors) are submodules and are
optimized with the student; its fixed state (e.g. margins) are buffers, saved in the checkpoint.
Options come from ``distill.options.<name>`` in the config, checked against the class's ``DEFAULTS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from dfakd.errors import DfakdError
from dfakd.models import FeatureNet, GroupInfo, NetFeatures


@dataclass(frozen=True)
class GroupPair:
    """A teacher group and the student group of the same spatial size."""

    teacher: GroupInfo
    student: GroupInfo

    @property
    def spatial(self) -> int:
        return self.teacher.spatial


def match_groups(teacher: FeatureNet, student: FeatureNet, input_size: int = 32) -> list[GroupPair]:
    """Pair teacher and student groups by spatial size; groups only one side has are left out."""
    t_groups = teacher.describe_groups(input_size)
    s_by_size = {g.spatial: g for g in student.describe_groups(input_size)}
    pairs = [GroupPair(t, s_by_size[t.spatial]) for t in t_groups if t.spatial in s_by_size]
    if not pairs:
        raise DfakdError("teacher and student share no group of the same spatial size")
    return pairs


@dataclass(frozen=True)
class DistillContext:
    """What some methods need beyond their options: the teacher's zoo name, the aggregation file."""

    teacher_arch: str
    aggregation: str | None = None


class DistillMethod(nn.Module):
    """Base class: set ``name`` and ``DEFAULTS``, implement ``forward`` returning named loss terms."""

    name: ClassVar[str]
    DEFAULTS: ClassVar[dict[str, Any]] = {"weight": 1.0}
    #: option -> (lower bound, bound allowed); every method's ``weight`` is >= 0
    BOUNDS: ClassVar[dict[str, tuple[float, bool]]] = {"weight": (0.0, True)}

    def __init__(self, teacher: FeatureNet, student: FeatureNet, options: dict[str, Any]) -> None:
        super().__init__()
        self.options = self.resolve_options(options)

    @classmethod
    def from_config(
        cls, teacher: FeatureNet, student: FeatureNet, options: dict[str, Any], context: DistillContext
    ) -> DistillMethod:
        """Build from config; methods that need the context override this."""
        return cls(teacher, student, options)

    @classmethod
    def resolve_options(cls, options: dict[str, Any] | None) -> dict[str, Any]:
        """The defaults with ``options`` over them; each option of the default's type and in its range
        (``BOUNDS``), so that a bad option is refused when a workflow is planned, not in the job."""
        where = f"distill.options.{cls.name}"
        if options is not None and not isinstance(options, dict):
            raise DfakdError(f"config key '{where}' must be a mapping of option: value, got {options!r}")
        options = dict(options or {})
        unknown = sorted(set(options) - set(cls.DEFAULTS))
        if unknown:
            raise DfakdError(
                f"unknown option(s) {', '.join(map(str, unknown))} for method '{cls.name}' "
                f"(config key '{where}'); allowed: {', '.join(cls.DEFAULTS)}"
            )
        for key, value in options.items():
            default = cls.DEFAULTS[key]
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = numeric and (isinstance(default, float) or isinstance(value, int))
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                kind = "a number" if isinstance(default, float) else "an integer"
                raise DfakdError(
                    f"option '{key}' of method '{cls.name}' (config key '{where}.{key}') must be {kind}, "
                    f"got {value!r}"
                )
        resolved = {**cls.DEFAULTS, **options}
        for key, (low, inclusive) in cls.BOUNDS.items():
            value = resolved[key]
            if value < low or (value == low and not inclusive):
                raise DfakdError(
                    f"option '{key}' of method '{cls.name}' (config key '{where}.{key}') must be "
                    f"{'>=' if inclusive else '>'} {low:g}, got {value!r}"
                )
        return {k: float(v) if isinstance(cls.DEFAULTS[k], float) else v for k, v in resolved.items()}

    def settings(self) -> dict[str, Any]:
        """What decides this method's loss, as flat ``distill.options.<name>.<key>`` settings (resolved
        options, defaults included); a job's fingerprint and MLflow params hold them."""
        return {f"distill.options.{self.name}.{key}": value for key, value in self.options.items()}

    def prepare(self, teacher: FeatureNet, batches) -> None:
        """Called once before training (not on resume): estimate fixed state from training data."""

    def forward(
        self, s: NetFeatures, t: NetFeatures, y: torch.Tensor, epoch: float
    ) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """Weighted loss terms, named ``<method>`` or ``<method>_<part>``; ``epoch`` is fractional."""
        raise NotImplementedError
