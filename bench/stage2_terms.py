#!/usr/bin/env python
"""Stage 2's feature terms, group by group, against the cross-entropy (a measurement, not a test).

For each ``dfakd distill`` run folder of an ``ofd`` or ``dfa`` student (its ``config.yaml`` and
``checkpoint.pt``), on the first ``--batches`` unaugmented batches of the training split, twice: with the
student and connectors as the job started them (seeded as the job seeds them, margins estimated as the job
does) and as they ended (the checkpoint). Per matched group:

- ``term``: the group's share of the feature loss, weighted as in the loss (OFD: weight / batch / decay^k);
- ``grad``: the norm of its gradient with respect to the student's own parameters, and ``cos``, the cosine
  between that gradient and the cross-entropy's (both summed over the batches);
- ``on``: the share of target positions the partial L2 counts (student above target, or target > 0);
  ``t>0``: the share of positive targets; ``margin``: the mean margin over channels; ``rms_t``: the rms of
  the margin-ReLU target.

Run it where the runs were made (the config's paths are relative to the workflow's folder)::

    python bench/stage2_terms.py results/ablation/students/mnist5k/resnet20_mnist/resnet8/{ofd,dfa_average}/s0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dfakd import config, data
from dfakd.files import load_checkpoint
from dfakd.jobs.common import eval_stream
from dfakd.jobs.distill import build_step
from dfakd.methods.distill import DistillStep
from dfakd.methods.ofd import AggregatedFeatureDistill
from dfakd.training.runtime import setup


def build(run_dir: Path) -> tuple[dict[str, Any], DistillStep, AggregatedFeatureDistill, Any]:
    """The run's config, its DistillStep as the job built it (margins estimated), and the data streams."""
    cfg = config.load([run_dir / "config.yaml"])
    cfg["runtime"]["device"] = "cpu"
    cfg["runtime"]["channels_last"] = False
    device = setup(cfg)
    step, _, _ = build_step(cfg, device, data.num_classes(cfg["dataset"]))
    feature = [p for p in step.parts if isinstance(p, AggregatedFeatureDistill)]
    if not feature:
        sys.exit(f"{run_dir}: method {cfg['distill']['method']!r} has no OFD-style feature term")
    train = data.load_split(cfg["dataset"], "train")
    feature[0].prepare(step.teacher[0], eval_stream(cfg, device, train))  # margins, as the job estimates them
    # the measured batches: training-sized, drawn at random (the split is stored class by class, and a
    # one-class batch would skew the batch statistics the student trains with)
    order = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(0))
    cfg["runtime"]["eval_batch_size"] = cfg["recipe"]["batch_size"]
    measured = eval_stream(cfg, device, train.subset(order))
    return cfg, step, feature[0], measured


def measure(step: DistillStep, part: AggregatedFeatureDistill, batches, limit: int) -> dict:
    params = [p for p in step.student.parameters() if p.requires_grad]
    n_groups = len(part.pairs)
    g_ce = [torch.zeros_like(p) for p in params]
    g_groups = [[torch.zeros_like(p) for p in params] for _ in range(n_groups)]
    ce_sum, term_sums = 0.0, [0.0] * n_groups
    on, pos, count = [0.0] * n_groups, [0.0] * n_groups, [0] * n_groups
    rms = [0.0] * n_groups
    step.train()  # as in training: batch statistics in the student's and connectors' BNs
    seen = 0
    for b, (x, y) in enumerate(batches):
        if b >= limit:
            break
        seen += 1
        with torch.no_grad():
            t = step.teacher[0].forward_features(x)
        s = step.student.forward_features(x)
        ce = F.cross_entropy(s.logits.float(), y)
        for acc, grad in zip(g_ce, torch.autograd.grad(ce, params, retain_graph=True), strict=True):
            acc += grad
        for i in range(n_groups):
            mapped, target = part.mapped_and_target(s, t, i)
            term = part.group_term(mapped, target, i, y.shape[0])
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            for acc, grad in zip(g_groups[i], grads, strict=True):
                if grad is not None:
                    acc += grad
            with torch.no_grad():
                on[i] += ((mapped > target) | (target > 0)).float().mean().item()
                pos[i] += (target > 0).float().mean().item()
                rms[i] += target.pow(2).mean().sqrt().item()
                count[i] += 1
            term_sums[i] += term.item()
        ce_sum += ce.item()
    flat_ce = torch.cat([g.flatten() for g in g_ce])
    groups = []
    for i, p in enumerate(part.pairs):
        flat = torch.cat([g.flatten() for g in g_groups[i]])
        cos = F.cosine_similarity(flat, flat_ce, dim=0).item() if flat.norm() > 0 else 0.0
        groups.append(
            {
                "spatial": p.spatial,
                "term": term_sums[i] / seen,
                "grad": flat.norm().item() / seen,
                "cos": cos,
                "on": on[i] / count[i],
                "t>0": pos[i] / count[i],
                "margin": getattr(part, f"margin_{i}").mean().item(),
                "rms_t": rms[i] / count[i],
            }
        )
    return {"ce": ce_sum / seen, "ce_grad": flat_ce.norm().item() / seen, "groups": groups}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="dfakd distill run folders (ofd or dfa)")
    parser.add_argument("--batches", type=int, default=8, help="training batches to measure on")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = []
    for run_dir in args.runs:
        cfg, step, part, batches = build(run_dir)
        tag = cfg["tracking"]["tags"].get("method") or cfg["distill"]["method"]
        at_start = measure(step, part, batches, args.batches)
        state = load_checkpoint(run_dir / "checkpoint.pt")
        step.load_state_dict(state["trainable"])
        at_end = measure(step, part, batches, args.batches)
        out.append(
            {"run": str(run_dir), "method": tag, "seed": cfg["seed"], "start": at_start, "end": at_end}
        )
        for when, fig in (("start", at_start), ("end", at_end)):
            print(f"{tag} s{cfg['seed']} {when}: ce {fig['ce']:.3f}, |grad ce| {fig['ce_grad']:.3f}")
            for g in fig["groups"]:
                print(
                    f"  {g['spatial']:>2} px: term {g['term']:.4f}, |grad| {g['grad']:.3f} "
                    f"({g['grad'] / fig['ce_grad']:.2f} x ce's), cos {g['cos']:+.2f}, on {g['on']:.2f}, "
                    f"t>0 {g['t>0']:.2f}, margin {g['margin']:+.3f}, rms_t {g['rms_t']:.3f}"
                )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
