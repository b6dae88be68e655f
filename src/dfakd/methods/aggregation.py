"""Feature aggregations: which teacher layers of each group are mixed, with which weights.

An aggregation file (YAML, METHOD.md section 3) is the inspectable output of ``dfakd derive`` and the input
of ``dfakd distill --method dfa``. It names the teacher architecture and, per group, the chosen teacher
layers by their stable names and their fixed weights (summing to 1). It holds nothing dataset-specific,
so an aggregation searched on one dataset distills on another (DFA-T)::

    format: dfakd-aggregation/1
    teacher: resnet20
    mode: prune
    groups:
      - spatial: 32
        layers: {layer1.1: 0.31, layer1.2: 0.69}
      - ...

Derivation modes from searched alphas: ``prune`` (alpha >= tau, renormalized), ``argmax``, ``topk``,
``full``; fixed baselines that need no search: ``last`` (ordinary feature distillation), ``average``,
``random`` (seeded).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from dfakd.errors import DfakdError
from dfakd.files import atomic_write_text, read_yaml
from dfakd.models import FeatureNet

FORMAT = "dfakd-aggregation/1"
SEARCHED_MODES = ("prune", "argmax", "topk", "full")
FIXED_MODES = ("last", "average", "random")
MODES = SEARCHED_MODES + FIXED_MODES
SUM_TOLERANCE = 1e-4


@dataclass
class GroupAggregation:
    spatial: int
    layers: dict[str, float]  # teacher layer name -> weight, in the teacher's forward order


@dataclass
class Aggregation:
    teacher: str
    mode: str
    groups: list[GroupAggregation]
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "teacher": self.teacher,
            "mode": self.mode,
            "source": self.source,
            "groups": [{"spatial": g.spatial, "layers": dict(g.layers)} for g in self.groups],
        }

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def for_spatial(self, spatial: int) -> GroupAggregation | None:
        return next((g for g in self.groups if g.spatial == spatial), None)

    def weight_vector(self, names: Sequence[str], spatial: int) -> torch.Tensor:
        """Weights over a teacher group's full candidate list (zeros for layers not chosen)."""
        group = self.for_spatial(spatial)
        if group is None:
            raise DfakdError(f"aggregation has no group of spatial size {spatial}")
        return torch.tensor([group.layers.get(n, 0.0) for n in names], dtype=torch.float32)


def derive_weights(alpha: Sequence[float], mode: str, tau: float = 0.1, k: int = 2) -> list[float]:
    """Discrete weights from a group's searched softmax weights ``alpha``."""
    a = [float(v) for v in alpha]
    if mode == "full":
        return a  # Algorithm 1: A_i from the searched softmax weights, exactly as they are
    if mode == "argmax":
        keep = [max(range(len(a)), key=lambda j: a[j])]
    elif mode == "topk":
        keep = sorted(sorted(range(len(a)), key=lambda j: -a[j])[: max(1, k)])
    elif mode == "prune":
        keep = [j for j, v in enumerate(a) if v >= tau] or [max(range(len(a)), key=lambda j: a[j])]
    else:
        raise DfakdError(f"unknown derive mode {mode!r}; searched modes: {', '.join(SEARCHED_MODES)}")
    total = sum(a[j] for j in keep)
    return [a[j] / total if j in keep else 0.0 for j in range(len(a))]


def fixed_weights(n: int, mode: str, generator: torch.Generator | None = None) -> list[float]:
    if mode == "last":
        return [0.0] * (n - 1) + [1.0]
    if mode == "average":
        return [1.0 / n] * n
    if mode == "random":
        w = torch.rand(n, generator=generator, dtype=torch.float64)
        return (w / w.sum()).tolist()
    raise DfakdError(f"unknown fixed aggregation mode {mode!r}; fixed modes: {', '.join(FIXED_MODES)}")


def _build(
    teacher_arch: str, groups: list[tuple[int, Sequence[str], Sequence[float]]], mode: str, source
) -> Aggregation:
    return Aggregation(
        teacher=teacher_arch,
        mode=mode,
        source=source,
        groups=[
            GroupAggregation(spatial, {n: float(w) for n, w in zip(names, weights, strict=True) if w > 0})
            for spatial, names, weights in groups
        ],
    )


def fixed(teacher_arch: str, pairs, mode: str, seed: int = 0) -> Aggregation:
    """A baseline aggregation (``last``/``average``/``random``) over the matched groups ``pairs``."""
    gen = torch.Generator().manual_seed(seed)
    groups = [(p.spatial, p.teacher.names, fixed_weights(len(p.teacher.names), mode, gen)) for p in pairs]
    return _build(
        teacher_arch, groups, mode, source=f"fixed:{mode}" + (f":seed{seed}" if mode == "random" else "")
    )


def from_search(
    search: dict[str, Any], mode: str, tau: float, k: int, source: str | None = None
) -> Aggregation:
    """Derive from a ``search.json`` document (see :mod:`dfakd.jobs.search`)."""
    groups = [(g["spatial"], g["layers"], derive_weights(g["alpha"], mode, tau, k)) for g in search["groups"]]
    return _build(search["teacher"], groups, mode, source)


def load(path: str | Path) -> Aggregation:
    path = Path(path)
    doc = read_yaml(path, "aggregation file")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DfakdError(f"{path} is not an aggregation file (expected 'format: {FORMAT}')")
    try:
        groups = [
            GroupAggregation(int(g["spatial"]), {str(n): float(w) for n, w in g["layers"].items()})
            for g in doc["groups"]
        ]
        agg = Aggregation(
            teacher=str(doc["teacher"]), mode=str(doc.get("mode")), groups=groups, source=doc.get("source")
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DfakdError(f"aggregation file {path} is malformed ({exc.__class__.__name__}: {exc})") from None
    for g in agg.groups:
        if not all(math.isfinite(w) for w in g.layers.values()):
            raise DfakdError(f"{path}: group {g.spatial}px has a weight that is not a finite number")
        total = sum(g.layers.values())
        if not g.layers or abs(total - 1.0) > SUM_TOLERANCE:
            raise DfakdError(f"{path}: weights of group {g.spatial}px sum to {total:.6g}, not 1")
        if any(w < 0 for w in g.layers.values()):
            raise DfakdError(f"{path}: group {g.spatial}px has a negative weight")
    return agg


def check_against(agg: Aggregation, teacher_arch: str, teacher: FeatureNet, pairs, source: str) -> None:
    """The aggregation must name this teacher, exactly the pair's matched groups, and real layers."""
    if agg.teacher != teacher_arch:
        raise DfakdError(f"{source} was made for teacher {agg.teacher!r}, not {teacher_arch!r}")
    expected = {p.spatial: p for p in pairs}
    sizes = [g.spatial for g in agg.groups]
    if sorted(sizes) != sorted(expected):
        raise DfakdError(
            f"{source} has groups at {sorted(sizes)} px but the teacher-student pair shares groups at "
            f"{sorted(expected)} px"
        )
    for g in agg.groups:
        names = expected[g.spatial].teacher.names
        unknown = [n for n in g.layers if n not in names]
        if unknown:
            raise DfakdError(
                f"{source}: group {g.spatial}px names layer(s) {', '.join(unknown)} that teacher "
                f"{teacher_arch} lacks there; its layers: {', '.join(names)}"
            )


def aggregate(candidates: Sequence[torch.Tensor], weights: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """A = sum_j w_j T^j over the candidates whose fixed weight is non-zero (a weight of exactly 1 on one
    layer returns that layer's tensor unchanged). In a training step pass the weights as Python floats:
    reading a CUDA tensor's values waits for the GPU."""
    w = weights.tolist() if isinstance(weights, torch.Tensor) else [float(v) for v in weights]
    chosen = [j for j, v in enumerate(w) if v != 0.0]
    if len(chosen) == 1 and w[chosen[0]] == 1.0:
        return candidates[chosen[0]]
    out = candidates[chosen[0]] * w[chosen[0]]
    for j in chosen[1:]:
        out = out.add(candidates[j], alpha=w[j])
    return out
