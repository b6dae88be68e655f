"""Stage 1 of DFA, the method alone: the bridge loss and the bi-level search step (torch only; ``dfakd
search`` in :mod:`dfakd.jobs.search` wires data, the loop and tracking around it).

Architecture parameters ``beta_i`` (one vector per matched teacher group, ``alpha_i = softmax(beta_i)``)
are kept apart from the weights (student + connectors). Each step alternates, first order, as the paper's
Algorithm 1 does:

1. **beta step** on a batch of the beta half of the training set: minimize
   ``sum_{i active} L_bridge_i + R(beta)`` over the active groups' betas only (BatchNorm statistics are
   left untouched by this step);
2. **weight step** on a batch of the weight half: minimize ``CE(student) + sum_i L_bridge_i`` over student
   and connectors, alphas held fixed.

The bridge loss of group i (METHOD.md section 2, eqs. 10-12), with ``A_i = sum_j alpha_ij T_i^j``::

    L_TS = CE(student.forward_from(i, F_t(A_i)), y)          # teacher -> student path: favors deep layers
    L_ST = mean_b || v_s / |v_s| - v_a / |v_a| ||^2          # student -> teacher path: favors shallow layers
           v_s = vec(F_s(S_i)), v_a = vec(A_i), per sample (C x H x W)
    L_bridge = gamma_ts * L_TS + gamma_st * L_ST

Both connectors are 1x1 convolutions (fig. 3); ``search.st_bn`` adds a BatchNorm to the ST connector and
``search.st_distance: mse`` replaces the scale-free distance by a raw MSE (ablations).

``groupwise`` (default) searches one group per phase, in order; a searched group keeps its derived
weights (``derive.*``) while later groups are searched, and groups not yet searched use the ``last``
layer. ``joint`` searches every group in a single phase.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfakd.methods import aggregation as agg_mod
from dfakd.methods.base import GroupPair, match_groups
from dfakd.models import FeatureNet, NetFeatures
from dfakd.training.runtime import autocast

ST_DISTANCES = ("normalized", "mse")


def unit_distance(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Eq. 11: the squared Euclidean distance between ``vec(u) / ||vec(u)||`` and ``vec(v) / ||vec(v)||``,
    per sample (``vec`` over C x H x W), averaged over the batch. Blind to the scale of either side."""
    u = F.normalize(u.flatten(1).float(), dim=1)
    v = F.normalize(v.flatten(1).float(), dim=1)
    return (u - v).pow(2).sum(dim=1).mean()


def conv1x1(in_channels: int, out_channels: int, bn: bool) -> nn.Sequential:
    """A connector of fig. 3: a 1x1 convolution (He-normal, fan-out), optionally followed by a BatchNorm."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels)) if bn else nn.Sequential(conv)


class BridgeSearch(nn.Module):
    """Architecture parameters (``betas``) and the two connectors per matched group."""

    def __init__(self, pairs: list[GroupPair], st_distance: str = "normalized", st_bn: bool = False) -> None:
        super().__init__()
        if st_distance not in ST_DISTANCES:
            raise ValueError(f"st_distance must be one of {ST_DISTANCES}")
        self.pairs = pairs
        self.st_distance = st_distance
        self.betas = nn.ParameterList(nn.Parameter(torch.zeros(len(p.teacher.names))) for p in pairs)
        # teacher -> student: 1x1 conv from teacher to student channels, fed into the student
        self.ts = nn.ModuleList(
            nn.Conv2d(p.teacher.channels, p.student.channels, kernel_size=1, bias=False) for p in pairs
        )
        # student -> teacher: 1x1 conv from student to teacher channels (+ BN with search.st_bn)
        self.st = nn.ModuleList(conv1x1(p.student.channels, p.teacher.channels, st_bn) for p in pairs)
        for i, p in enumerate(pairs):
            self.register_buffer(
                f"fixed_{i}", torch.tensor(agg_mod.fixed_weights(len(p.teacher.names), "last"))
            )
        self.active: list[int] = list(range(len(pairs)))

    def weight_parameters(self) -> list[nn.Parameter]:
        return [*self.ts.parameters(), *self.st.parameters()]

    def arch_parameters(self) -> list[nn.Parameter]:
        return list(self.betas)

    def alpha(self, i: int) -> torch.Tensor:
        return F.softmax(self.betas[i], dim=0) if i in self.active else getattr(self, f"fixed_{i}")

    def fix(self, i: int, weights: list[float]) -> None:
        getattr(self, f"fixed_{i}").copy_(torch.tensor(weights))

    def bridge(
        self,
        student: FeatureNet,
        s: NetFeatures,
        t: NetFeatures,
        y: torch.Tensor,
        groups: list[int],
        detach_alpha: bool = False,
    ) -> dict[str, torch.Tensor]:
        """``ts_i`` and ``st_i`` loss terms (unweighted) for each group in ``groups``."""
        terms = {}
        for i in groups:
            p = self.pairs[i]
            alpha = self.alpha(i).detach() if detach_alpha else self.alpha(i)
            cands = t.candidates[p.teacher.index]
            a = sum(alpha[j] * cands[j] for j in range(len(cands)))
            logits = student.forward_from(p.student.index, self.ts[i](a))
            terms[f"ts_{i}"] = F.cross_entropy(logits.float(), y)
            mapped = self.st[i](s.candidates[p.student.index][-1])
            if self.st_distance == "normalized":
                terms[f"st_{i}"] = unit_distance(mapped, a)
            else:
                terms[f"st_{i}"] = F.mse_loss(mapped.float(), a.float())
        return terms

    def regularizer(self, kind: str, groups: list[int]) -> torch.Tensor:
        if kind == "entropy":
            return sum(-(self.alpha(i) * torch.log(self.alpha(i) + 1e-12)).sum() for i in groups)
        if kind == "l2":
            return sum(self.betas[i].pow(2).sum() for i in groups)
        return torch.zeros(())


@contextlib.contextmanager
def frozen_batchnorm_stats(*modules: nn.Module):
    """Run forwards in train mode (batch statistics) without updating BN running statistics."""
    bns = [m for mod in modules for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(bn.momentum, bn.num_batches_tracked.clone()) for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    try:
        yield
    finally:
        for bn, (momentum, tracked) in zip(bns, saved, strict=True):
            bn.momentum = momentum
            bn.num_batches_tracked.copy_(tracked)


def cosine_lr(step: int, total: int, lr: float, lr_min: float) -> float:
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * step / max(1, total)))


def phases(schedule: str, n_groups: int) -> list[list[int]]:
    return [[i] for i in range(n_groups)] if schedule == "groupwise" else [list(range(n_groups))]


def weighted_bridge(terms: dict[str, torch.Tensor], scfg: dict[str, Any]) -> torch.Tensor:
    total = torch.zeros((), device=next(iter(terms.values())).device)
    for name, value in terms.items():
        total = total + (scfg["gamma_ts"] if name.startswith("ts_") else scfg["gamma_st"]) * value
    return total


class Searcher:
    """The bi-level search state: frozen teacher, student, bridge (betas + connectors), two optimizers."""

    def __init__(self, cfg: dict[str, Any], teacher: FeatureNet, student: FeatureNet, device: torch.device):
        self.scfg = cfg["search"]
        self.precision = cfg["runtime"]["precision"]
        self.device = device
        self.teacher, self.student = teacher, student
        self.pairs = match_groups(teacher, student)
        self.bridge = BridgeSearch(self.pairs, self.scfg["st_distance"], self.scfg["st_bn"]).to(device)
        self.w_opt = torch.optim.SGD(
            [*student.parameters(), *self.bridge.weight_parameters()],
            lr=self.scfg["w_lr"],
            momentum=self.scfg["w_momentum"],
            weight_decay=self.scfg["w_weight_decay"],
        )
        self.beta_opt = torch.optim.Adam(
            self.bridge.arch_parameters(),
            lr=self.scfg["beta_lr"],
            betas=tuple(self.scfg["beta_betas"]),
            weight_decay=self.scfg["beta_weight_decay"],
        )

    def weight_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
        """Student + connectors on a weight-half batch: CE + every group's bridge loss, alphas fixed."""
        for group in self.w_opt.param_groups:
            group["lr"] = lr
        with autocast(self.device, self.precision):
            with torch.no_grad():
                t = self.teacher.forward_features(x)
            s = self.student.forward_features(x)
            terms = self.bridge.bridge(self.student, s, t, y, list(range(len(self.pairs))), detach_alpha=True)
            ce = F.cross_entropy(s.logits.float(), y)
            loss = ce + weighted_bridge(terms, self.scfg)
        self.w_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.w_opt.step()
        return {"w_loss": loss.detach(), "ce": ce.detach(), **{k: v.detach() for k, v in terms.items()}}

    def beta_step(
        self, x: torch.Tensor, y: torch.Tensor, groups: list[int], update: bool = True
    ) -> torch.Tensor:
        """The active groups' betas on a beta-half batch (first order); BN statistics untouched.
        ``update=False`` only measures the loss (a warm-up epoch)."""
        with (
            frozen_batchnorm_stats(self.student, self.bridge),
            autocast(self.device, self.precision),
            torch.set_grad_enabled(update),
        ):
            with torch.no_grad():
                t = self.teacher.forward_features(x)
                s = self.student.forward_features(x)
            loss = weighted_bridge(self.bridge.bridge(self.student, s, t, y, groups), self.scfg)
            if self.scfg["regularizer"] != "none":
                reg = self.bridge.regularizer(self.scfg["regularizer"], groups)
                loss = loss + self.scfg["regularizer_weight"] * reg
        if not update:
            return loss.detach()
        active = [self.bridge.betas[i] for i in groups]
        grads = torch.autograd.grad(loss, active)
        self.beta_opt.zero_grad(set_to_none=True)
        for beta, grad in zip(active, grads, strict=True):
            beta.grad = grad
        self.beta_opt.step()
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        return {
            "student": self.student.state_dict(),
            "bridge": self.bridge.state_dict(),
            "w_opt": self.w_opt.state_dict(),
            "beta_opt": self.beta_opt.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.bridge.load_state_dict(state["bridge"])
        self.w_opt.load_state_dict(state["w_opt"])
        self.beta_opt.load_state_dict(state["beta_opt"])

    def result(self) -> list[dict[str, Any]]:
        with torch.no_grad():
            return [
                {
                    "spatial": p.spatial,
                    "teacher_group": p.teacher.index,
                    "student_group": p.student.index,
                    "layers": list(p.teacher.names),
                    "beta": self.bridge.betas[i].tolist(),
                    "alpha": F.softmax(self.bridge.betas[i], 0).tolist(),
                }
                for i, p in enumerate(self.pairs)
            ]
