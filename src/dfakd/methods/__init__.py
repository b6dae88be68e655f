"""Distillation methods (one class per method, one file each), the DFA search, and aggregations.

Adding a method: write ``methods/<name>.py`` with a :class:`DistillMethod` subclass and list it here.
"""

from __future__ import annotations

from typing import Any

from dfakd.errors import DfakdError
from dfakd.methods.at import AT
from dfakd.methods.base import DistillContext, DistillMethod, GroupPair, match_groups
from dfakd.methods.dkd import DKD
from dfakd.methods.fitnet import FitNet
from dfakd.methods.kd import KD
from dfakd.methods.ofd import DFA, OFD
from dfakd.models import FeatureNet

METHODS: dict[str, type[DistillMethod]] = {cls.name: cls for cls in (KD, DKD, AT, FitNet, OFD, DFA)}
VANILLA = "vanilla"

__all__ = ["METHODS", "DistillContext", "DistillMethod", "GroupPair", "build", "match_groups", "parse_method"]


def parse_method(spec: str) -> list[str]:
    """``'dfa+kd'`` -> ``['dfa', 'kd']``; ``'vanilla'`` -> ``[]`` (cross-entropy alone)."""
    names = [n.strip() for n in spec.split("+") if n.strip()]
    if names == [VANILLA]:
        return []
    allowed = ", ".join([VANILLA, *METHODS])
    for name in names:
        if name not in METHODS:
            raise DfakdError(f"unknown method {name!r} (config key 'distill.method'); available: {allowed}")
    if not names or len(set(names)) != len(names):
        raise DfakdError(f"distill.method {spec!r} must name each method once, e.g. dfa or dfa+kd")
    return names


def build(
    names: list[str],
    teacher: FeatureNet,
    student: FeatureNet,
    options: dict[str, Any],
    context: DistillContext,
) -> list[DistillMethod]:
    for name, opts in options.items():
        if name not in METHODS:
            raise DfakdError(f"distill.options has options for unknown method {name!r}")
        METHODS[name].resolve_options(opts)  # options of a method not in use are checked too
    return [METHODS[n].from_config(teacher, student, options.get(n) or {}, context) for n in names]
