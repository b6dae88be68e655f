"""Stage 1 of DFA: differentiable group-wise search of the feature aggregation with the bridge loss.

Architecture parameters ``beta_i`` (one vector per matched teacher group, ``alpha_i = softmax(beta_i)``)
are kept apart from the weights (student + connectors). Each step alternates, first order, DARTS-style:

1. **weight step** on a batch of the weight half of the training set: minimize
   ``CE(student) + sum_i L_bridge_i`` over student and connectors, alphas held fixed;
2. **beta step** on a batch of the beta half: minimize ``sum_{i active} L_bridge_i + R(beta)`` over the
   active groups' betas only (BatchNorm statistics are left untouched by this step).

The bridge loss of group i (METHOD.md section 2), with ``A_i = sum_j alpha_ij T_i^j``::

    L_TS = CE(student.forward_from(i, F_t(A_i)), y)     # teacher -> student path: favors deep layers
    L_ST = mean((F_s(S_i) - A_i)^2)                     # student -> teacher path: favors shallow layers
    L_bridge = gamma_ts * L_TS + gamma_st * L_ST

``groupwise`` (default) searches one group per phase, in order; a searched group keeps its derived
weights (``derive.*``) while later groups are searched, and groups not yet searched use the ``last``
layer. ``joint`` searches every group in a single phase.

Results in the run folder: ``search.json`` (final beta/alpha per group), ``alpha_trajectory.csv``,
``alphas.png`` (heatmap) and ``alpha_trajectory.png``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dfakd import data, models
from dfakd.errors import DfakdError
from dfakd.methods import aggregation as agg_mod
from dfakd.methods.base import GroupPair, match_groups
from dfakd.methods.ofd import connector
from dfakd.models import FeatureNet, NetFeatures
from dfakd.training import checkpoint as ckpt
from dfakd.training.loop import rng_state, set_rng_state, write_metrics_csv
from dfakd.training.preemption import Preempted, stop_on_sigterm
from dfakd.training.runtime import Progress, autocast, log

CHECKPOINT = "search_checkpoint.pt"
RESULT = "search.json"


class BridgeSearch(nn.Module):
    """Architecture parameters (``betas``) and the two connectors per matched group."""

    def __init__(self, pairs: list[GroupPair]) -> None:
        super().__init__()
        self.pairs = pairs
        self.betas = nn.ParameterList(nn.Parameter(torch.zeros(len(p.teacher.names))) for p in pairs)
        # teacher -> student: 1x1 conv from teacher to student channels, fed into the student
        self.ts = nn.ModuleList(
            nn.Conv2d(p.teacher.channels, p.student.channels, kernel_size=1, bias=False) for p in pairs
        )
        # student -> teacher: 1x1 conv + BN from student to teacher channels
        self.st = nn.ModuleList(connector(p.student.channels, p.teacher.channels) for p in pairs)
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
            terms[f"st_{i}"] = F.mse_loss(self.st[i](s.candidates[p.student.index][-1]).float(), a.float())
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
        self.bridge = BridgeSearch(self.pairs).to(device)
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

    def beta_step(self, x: torch.Tensor, y: torch.Tensor, groups: list[int]) -> torch.Tensor:
        """The active groups' betas on a beta-half batch (first order); BN statistics untouched."""
        with frozen_batchnorm_stats(self.student, self.bridge), autocast(self.device, self.precision):
            with torch.no_grad():
                t = self.teacher.forward_features(x)
                s = self.student.forward_features(x)
            loss = weighted_bridge(self.bridge.bridge(self.student, s, t, y, groups), self.scfg)
            if self.scfg["regularizer"] != "none":
                reg = self.bridge.regularizer(self.scfg["regularizer"], groups)
                loss = loss + self.scfg["regularizer_weight"] * reg
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


def search(cfg: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """``dfakd search``: run stage 1 and write ``search.json`` and its plots."""
    from dfakd.training.jobs import already_done, load_teacher, open_job, train_stream
    from dfakd.training.runtime import prepare_module, setup

    run_dir = Path(run_dir)
    done = already_done(run_dir, RESULT)
    if done is not None:
        return done
    student_arch = cfg["model"]["arch"]
    device = setup(cfg)
    n_classes = data.num_classes(cfg["dataset"])
    teacher, teacher_arch = load_teacher(cfg, n_classes)
    channels_last = cfg["runtime"]["channels_last"]
    teacher = prepare_module(teacher, device, channels_last).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    full = data.load_split(cfg["dataset"], "train")
    w_idx, b_idx = data.stratified_halves(full.labels, cfg["seed"])
    search_cfg = {**cfg, "recipe": {**cfg["recipe"], "batch_size": cfg["search"]["batch_size"]}}
    w_stream = train_stream(search_cfg, device, full.subset(w_idx))
    b_stream = train_stream(search_cfg, device, full.subset(b_idx))
    b_stream.stream_id = 1
    torch.manual_seed(cfg["seed"])
    student = prepare_module(models.build(student_arch, n_classes), device, channels_last)
    searcher = Searcher(cfg, teacher, student, device)
    pair = f"{teacher_arch}-{student_arch}"
    tags = {"teacher": teacher_arch, "student": student_arch, "pair": pair, "method": "dfa"}
    job = open_job(cfg, run_dir, device, "search", f"search-{pair}-s{cfg['seed']}", tags)
    try:
        shared = {p.spatial for p in searcher.pairs}
        skipped = [g.spatial for g in teacher.describe_groups() if g.spatial not in shared]
        log(f"searching groups at {sorted(shared, reverse=True)} px")
        if skipped:
            log(f"teacher groups at {skipped} px have no student group of that size and are left out")
        trajectory = run_search(job, searcher, w_stream, b_stream)

        result = {
            "teacher": teacher_arch,
            "student": student_arch,
            "dataset": cfg["dataset"]["name"],
            "seed": cfg["seed"],
            "schedule": cfg["search"]["schedule"],
            "steps": trajectory[-1][0] if trajectory else 0,
            "skipped_teacher_groups": skipped,
            "groups": searcher.result(),
        }
        write_outputs(job, result, trajectory, searcher.pairs)
    except BaseException as exc:
        job.tracker.abort(exc)
        raise
    return result


def run_search(job, searcher: Searcher, w_stream, b_stream) -> list[list[float]]:
    """The alternating loop over phases and epochs, with per-epoch checkpoints, resume and SIGTERM."""
    cfg, scfg, bridge = job.cfg, searcher.scfg, searcher.bridge
    plan = phases(scfg["schedule"], len(searcher.pairs))
    epochs_total = len(plan) * scfg["epochs"]
    steps = len(w_stream)
    total_steps = epochs_total * steps
    if steps == 0:
        raise DfakdError(f"search.batch_size {scfg['batch_size']} is larger than half the training set")
    trajectory: list[list[float]] = []  # [step, phase, group, alpha_0, alpha_1, ...]
    history: list[dict[str, float]] = []
    metric_rows: list[dict[str, float]] = []  # what goes to MLflow per epoch (search_metrics.csv)
    start_epoch, start_step, partial = 0, 0, None
    state_path = job.run_dir / CHECKPOINT
    if state_path.is_file():
        state = ckpt.load(state_path, map_location=job.device)
        searcher.load_state_dict(state)
        start_epoch, start_step, partial = state["epoch"], state["step"], state["partial"]
        trajectory, history, metric_rows = state["trajectory"], state["history"], state["metric_rows"]
        set_rng_state(state["rng"])
        log(f"resuming search after epoch {start_epoch}" + (f", step {start_step}" if start_step else ""))

    def save(epoch: int, step: int, partial: dict | None) -> None:
        extra = {"trajectory": trajectory, "history": history, "metric_rows": metric_rows, "rng": rng_state()}
        ckpt.atomic_save(
            {**searcher.state_dict(), "epoch": epoch, "step": step, "partial": partial, **extra}, state_path
        )

    with stop_on_sigterm() as stop:
        for epoch in range(start_epoch, epochs_total):
            phase = epoch // scfg["epochs"]
            groups = plan[phase]
            bridge.active = groups
            w_stream.set_epoch(epoch)
            b_stream.set_epoch(epoch)
            searcher.student.train()
            bridge.train()
            label = f"search epoch {epoch + 1}/{epochs_total} (groups {groups})"
            progress = Progress(steps, label, cfg["runtime"]["log_every"])
            skip = start_step if epoch == start_epoch else 0
            sums, elapsed = (dict(partial["sums"]), partial["time"]) if skip and partial else ({}, 0.0)
            t0 = time.perf_counter()
            for step, ((x, y), (xv, yv)) in enumerate(zip(w_stream, itertools.cycle(b_stream))):
                if step < skip:
                    continue  # done before the interruption; drawn again to keep random streams aligned
                global_step = epoch * steps + step
                terms = searcher.weight_step(
                    x, y, cosine_lr(global_step, total_steps, scfg["w_lr"], scfg["w_lr_min"])
                )
                terms["beta_loss"] = searcher.beta_step(xv, yv, groups)
                for name in ("w_loss", "beta_loss"):
                    if not torch.isfinite(terms[name]):
                        raise DfakdError(
                            f"non-finite search {name} ({terms[name].item()}) at epoch {epoch + 1}, step "
                            f"{step + 1}; the last good checkpoint is kept in {state_path}"
                        )
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + float(value)
                if global_step % scfg["record_every"] == 0 or step + 1 == steps:
                    with torch.no_grad():
                        trajectory.extend(
                            [global_step + 1, phase, i, *bridge.alpha(i).tolist()] for i in groups
                        )
                if progress.tty or (step + 1) % progress.every == 0 or step + 1 == steps:
                    progress.update(
                        step, f"w {float(terms['w_loss']):.3f} beta {float(terms['beta_loss']):.3f}"
                    )
                if stop.requested and step + 1 < steps:
                    save(epoch, step + 1, {"sums": sums, "time": elapsed + time.perf_counter() - t0})
                    raise Preempted(
                        f"SIGTERM: saved {state_path} at epoch {epoch + 1}, step {step + 1}; rerun to resume"
                    )

            if scfg["schedule"] == "groupwise" and (epoch + 1) % scfg["epochs"] == 0:
                for i in groups:
                    mode, tau, k = _searched_mode(cfg), cfg["derive"]["tau"], cfg["derive"]["k"]
                    weights = agg_mod.derive_weights(bridge.alpha(i).tolist(), mode, tau, k)
                    log(f"group {searcher.pairs[i].spatial}px: {fmt(bridge.alpha(i))} -> fixed {weights}")
                    bridge.fix(i, weights)
            row = {"epoch": epoch + 1, **{k: v / steps for k, v in sums.items()}}
            row["epoch_time_s"] = elapsed + time.perf_counter() - t0
            history.append(row)
            metrics = {k: v for k, v in row.items() if k != "epoch"}
            with torch.no_grad():
                for i, p in enumerate(searcher.pairs):
                    for name, a in zip(p.teacher.names, F.softmax(bridge.betas[i], 0).tolist(), strict=True):
                        metrics[f"alpha.g{p.spatial}.{name}"] = a
            metric_rows.append({"epoch": epoch + 1, **metrics})
            write_metrics_csv(job.run_dir / "search_metrics.csv", metric_rows)
            job.tracker.log_metrics(metrics, step=epoch + 1)
            save(epoch + 1, 0, None)
            log(
                f"search epoch {epoch + 1}/{epochs_total}: w-loss {row['w_loss']:.4f}, "
                f"bridge (beta half) {row['beta_loss']:.4f}, {row['epoch_time_s']:.1f}s"
            )
            if stop.requested and epoch + 1 < epochs_total:
                raise Preempted(f"SIGTERM: saved {state_path} after epoch {epoch + 1}; rerun to resume")
    return trajectory


def write_outputs(job, result: dict[str, Any], trajectory: list[list[float]], pairs: list[GroupPair]) -> None:
    from dfakd.plots import alpha_heatmap, alpha_trajectory_plot

    run_dir = job.run_dir
    write_trajectory(run_dir / "alpha_trajectory.csv", trajectory, pairs)
    alpha_heatmap(result, run_dir / "alphas.png")
    alpha_trajectory_plot(run_dir / "alpha_trajectory.csv", run_dir / "alpha_trajectory.png")
    ckpt.atomic_write_text(run_dir / RESULT, json.dumps(result, indent=2) + "\n")
    job.tracker.finish()


def _searched_mode(cfg: dict[str, Any]) -> str:
    """The derivation used to fix a searched group during a groupwise search (a fixed mode means prune)."""
    mode = cfg["derive"]["mode"]
    return mode if mode in agg_mod.SEARCHED_MODES else "prune"


def fmt(alpha: torch.Tensor) -> str:
    return "[" + ", ".join(f"{a:.3f}" for a in alpha.tolist()) + "]"


def write_trajectory(path: Path, trajectory: list[list[float]], pairs: list[GroupPair]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["step", "phase", "spatial", "layer", "alpha"])
    for row in trajectory:
        step, phase, i = int(row[0]), int(row[1]), int(row[2])
        for name, a in zip(pairs[i].teacher.names, row[3:], strict=True):
            writer.writerow([step, phase, pairs[i].spatial, name, f"{a:.6f}"])
    ckpt.atomic_write_text(path, buf.getvalue())
