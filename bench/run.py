#!/usr/bin/env python
"""dfakd performance benchmark (a benchmark, not a test): ``python bench/run.py --help``.

For one teacher-student pair, batch size, device and precision it measures, after warm-up, the median
of repeated timings of

- (a) ``student``: the student's plain training step (cross-entropy only; ``DistillStep`` with no method);
- (b) ``teacher``: the teacher's ``forward_features`` under ``no_grad`` (what a distillation step runs);
- (c) ``floor``: (a) + (b) in one step (``DistillStep`` with a method that adds no loss term), the least
  any distillation step can cost;
- (d) each distillation method's training step (``DistillStep`` + ``methods.build``);
- (e) ``search``: one DFA search step (``Searcher.weight_step`` + ``Searcher.beta_step``);
- (f) ``eval``: ``loop.evaluate`` (``inference_mode``, ``runtime.eval_batch_size`` batches);
- ``data``: the device-resident ``BatchStream`` (crop/flip/normalize in batch) on synthetic uint8 data;
- a precision section: the floor and the dfa step in fp32 vs bf16 autocast + channels-last.

Every training step is forward + backward + SGD step (``zero_grad(set_to_none=True)`` and the
``isfinite`` check of ``loop.fit``). Figures are measured round-robin (one step of every figure per
round) so that a change of machine load during the run affects all of them alike; each figure's time is
the median over the rounds. ``--demo-dag`` instead times the demo workflow end to end.

Peak memory is taken in each figure's last warm-up step (so that no timed step pays for measuring it):
on CUDA, ``torch.cuda.max_memory_allocated`` during the step minus what was allocated before it (the
step's activations, gradients and workspace). On CPU there is no allocator counter, so it is the rise of
the process's resident set size (``/proc/self/statm``, sampled every 2 ms by a thread, after
``malloc_trim``) over its value just before the step: an approximation that can miss short spikes.

Inputs are in the memory format of the mode, as ``BatchStream`` yields them in a job (contiguous with
channels-last off), so each mode's figures are the package's real path in that mode.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfakd import config, data, methods, models
from dfakd.data.datasets import ImageSplit
from dfakd.methods import aggregation as agg_mod
from dfakd.methods.base import DistillMethod, match_groups
from dfakd.methods.bridge import Searcher
from dfakd.methods.distill import DistillStep
from dfakd.training import loop
from dfakd.training.runtime import autocast, compiled, prepare_module, setup
from dfakd.training.schedule import sgd

REPO = Path(__file__).resolve().parent.parent
ALL_METHODS = ("kd", "fitnet", "at", "ofd", "dkd", "dfa")
CIFAR_MEAN, CIFAR_STD = data.DATASETS["cifar100"].mean, data.DATASETS["cifar100"].std
MiB = 2**20

# Targets of the issue (benchmarks, not tests)
TARGET_THROUGHPUT = {"dfa": 0.9, "ofd": 0.9, "kd": 0.95}  # x the floor's images/s
TARGET_SEARCH_TIME = 2.5  # x the floor's time
TARGET_DATA = 10.0  # x the training step's images/s
TARGET_BF16 = 1.6  # bf16 + channels_last vs fp32 images/s
TARGET_DAG_S = 600.0
TARGET_H100_MIN = 30.0


# ------------------------------------------------------------------------------------ memory, timing


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory of one region above what was in use when it started (see the module docstring)."""

    def __init__(self, device: torch.device, interval: float = 0.002) -> None:
        self.device, self.interval = device, interval
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif sys.platform.startswith("linux"):
            _malloc_trim()
            self.base = self.peak = _rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.base)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


@dataclass
class Figure:
    name: str
    label: str
    step: Callable[[], Any]
    images: int  # images per step
    mode: str = ""  # precision section: fp32 / bf16+cl ...
    first_s: float = 0.0  # first warm-up call (includes torch.compile's compilation)
    times: list[float] = field(default_factory=list)
    mems: list[int] = field(default_factory=list)
    peak_abs: int = 0

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)

    @property
    def images_per_s(self) -> float:
        return self.images / self.median_s

    def as_dict(self, floor: Figure | None) -> dict[str, Any]:
        out = {
            "name": self.name,
            "label": self.label,
            "mode": self.mode,
            "images_per_step": self.images,
            "median_s": self.median_s,
            "min_s": min(self.times),
            "max_s": max(self.times),
            "times_s": self.times,
            "images_per_s": self.images_per_s,
            "peak_mem_delta_mib": max(self.mems) / MiB if self.mems else None,
            "peak_mem_abs_mib": self.peak_abs / MiB,
            "first_call_s": self.first_s,
            "compile_s_estimate": max(0.0, self.first_s - self.median_s),
        }
        if floor is not None:
            out["throughput_vs_floor"] = self.images_per_s / floor.images_per_s
            out["time_vs_floor"] = self.median_s / floor.median_s
        return out


def measure(figures: list[Figure], device: torch.device, warmup: int, repeats: int, verbose: bool) -> None:
    """Warm each figure up (its peak memory is taken in its last warm-up step), then time ``repeats``
    round-robin rounds (one step of every figure each)."""
    for f in figures:
        for i in range(max(1, warmup)):
            if i + 1 == max(1, warmup):  # memory from the last warm-up step, so no timed step pays for it
                with PeakMemory(device) as mem:
                    t = timed(f.step, device)
                f.mems.append(mem.delta)
                f.peak_abs = mem.peak
            else:
                t = timed(f.step, device)
            if i == 0:
                f.first_s = t
        if verbose:
            print(f"  warmed up {f.label} ({f.first_s:.2f}s first call)", file=sys.stderr, flush=True)
    for r in range(repeats):
        for f in figures:
            f.times.append(timed(f.step, device))
        if verbose:
            print(f"  round {r + 1}/{repeats} done", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ the pieces


class NoLoss(DistillMethod):
    """A method that adds no loss term: ``DistillStep`` then runs exactly student + teacher (the floor)."""

    name = "floor"

    def forward(self, s, t, y, epoch):
        return {}


@dataclass
class Mode:
    precision: str  # fp32 | bf16
    channels_last: bool

    @property
    def name(self) -> str:
        parts = [self.precision] + (["channels_last"] if self.channels_last else [])
        return "+".join(parts)


def synthetic_split(n: int, classes: int, seed: int, size: int = 32) -> ImageSplit:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    return ImageSplit(images, labels, [str(c) for c in range(classes)])


class Bench:
    """Models, batches and step functions for one device; figures are built per precision mode."""

    def __init__(self, args: argparse.Namespace, device: torch.device, tmp: Path) -> None:
        self.args, self.device, self.tmp = args, device, tmp
        self.recipe = copy.deepcopy(config.DEFAULTS["recipe"])
        torch.manual_seed(0)
        self.teacher_fp = models.build(args.teacher, args.classes).eval()
        for p in self.teacher_fp.parameters():
            p.requires_grad_(False)
        self.student_init = models.build(args.student, args.classes)
        self.pairs = match_groups(self.teacher_fp, self.student_init)
        self.agg_path = tmp / "aggregation-average.yaml"
        agg_mod.fixed(args.teacher, self.pairs, "average").save(self.agg_path)
        split = synthetic_split(4 * args.batch, args.classes, seed=1)
        stream = data.BatchStream(
            split, args.batch, device, CIFAR_MEAN, CIFAR_STD, train=True, augment="crop_flip"
        )
        self.batches = [(x, y) for x, y in stream]  # fixed, already prepared batches (compute only)
        self.teachers: dict[bool, nn.Module] = {}

    def teacher(self, channels_last: bool) -> nn.Module:
        if channels_last not in self.teachers:
            t = copy.deepcopy(self.teacher_fp)
            self.teachers[channels_last] = prepare_module(t, self.device, channels_last).eval()
        return self.teachers[channels_last]

    def batch(self, i: int, mode: Mode) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batches[i]
        return (x.contiguous(memory_format=torch.channels_last) if mode.channels_last else x), y

    def student(self) -> nn.Module:
        return copy.deepcopy(self.student_init).to(self.device)

    def distill_step(self, spec: str, mode: Mode) -> DistillStep:
        teacher, student = self.teacher(mode.channels_last), self.student()
        if spec == "vanilla":
            parts: list[DistillMethod] = []
        elif spec == "floor":
            parts = [NoLoss(teacher, student, {})]
        else:
            names = methods.parse_method(spec)
            context = methods.DistillContext(self.args.teacher, str(self.agg_path))
            parts = methods.build(names, teacher, student, {}, context)
        step = prepare_module(DistillStep(student, teacher, parts, 1.0), self.device, mode.channels_last)
        x, _ = self.batch(1, mode)
        for part in step.parts:  # margins of ofd/dfa from two batches (their values do not change the cost)
            part.prepare(teacher, [(x, None), (x, None)])
        return step

    def train_figure(self, name: str, label: str, spec: str, mode: Mode) -> Figure:
        step = self.distill_step(spec, mode)
        optimizer = sgd(step.parameters(), self.recipe)
        loss_fn = compiled(step.loss, self.args.compile)
        graphs = self.args.compile == "reduce-overhead"
        x, y = self.batch(0, mode)
        device = self.device

        def run() -> None:  # the body of SupervisedTask.step
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(device, mode.precision):
                loss, _, _ = loss_fn(x, y, 0.5)
            if not torch.isfinite(loss):
                raise RuntimeError(f"{name}: non-finite loss {loss.item()}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        step.train()
        return Figure(name, label, run, len(y), mode.name)

    def teacher_figure(self, mode: Mode) -> Figure:
        teacher = self.teacher(mode.channels_last)
        forward = compiled(teacher.forward_features, self.args.compile)
        x, _ = self.batch(0, mode)

        def run() -> None:
            if self.args.compile == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(self.device, mode.precision), torch.no_grad():
                forward(x)

        return Figure("teacher", "(b) teacher forward", run, len(x), mode.name)

    def search_figure(self, mode: Mode) -> Figure:
        cfg = copy.deepcopy(config.DEFAULTS)
        cfg["runtime"]["precision"] = mode.precision
        student = prepare_module(self.student(), self.device, mode.channels_last)
        searcher = Searcher(cfg, self.teacher(mode.channels_last), student, self.device)
        searcher.bridge.active = [0]  # groupwise phase 1: the first group's beta step is the costliest
        searcher.student.train()
        searcher.bridge.train()
        (x, y), (xv, yv) = self.batch(0, mode), self.batch(2, mode)

        def run() -> None:  # the body of search.run_search's step loop
            terms = searcher.weight_step(x, y, cfg["search"]["w_lr"])
            beta = searcher.beta_step(xv, yv, [0])
            if not (torch.isfinite(terms["w_loss"]) and torch.isfinite(beta)):
                raise RuntimeError("search: non-finite loss")

        return Figure("search", "(e) DFA search step (weight + beta)", run, len(y), mode.name)

    def eval_figure(self, mode: Mode, n: int, batch: int, name: str = "eval") -> Figure:
        split = synthetic_split(n, self.args.classes, seed=2)
        stream = data.BatchStream(
            split, batch, self.device, CIFAR_MEAN, CIFAR_STD, train=False, channels_last=mode.channels_last
        )
        student = prepare_module(self.student(), self.device, mode.channels_last)
        label = f"(f) evaluation, batch {batch}"
        return Figure(name, label, lambda: loop.evaluate(student, stream, mode.precision), n, mode.name)

    def data_figure(self, mode: Mode, n_images: int, n_batches: int) -> Figure:
        split = synthetic_split(n_images, self.args.classes, seed=3)
        stream = data.BatchStream(
            split,
            self.args.batch,
            self.device,
            CIFAR_MEAN,
            CIFAR_STD,
            train=True,
            augment="crop_flip",
            channels_last=mode.channels_last,
        )
        n_batches = min(n_batches, len(stream))
        epoch = [0]

        def run() -> None:
            epoch[0] += 1
            stream.set_epoch(epoch[0])
            for b, _ in enumerate(stream):
                if b + 1 == n_batches:
                    break

        label = f"data: BatchStream, {n_images // 1000}k uint8 images on {self.device.type}"
        return Figure("data", label, run, n_batches * self.args.batch, mode.name)


# ------------------------------------------------------------------------------------------- reporting


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    info = {
        "cpu": cpu,
        "cpu_flags": sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2"))),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "load_average_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return info


def fmt_mem(fig: Figure) -> str:
    return f"{max(fig.mems) / MiB:8.0f}" if fig.mems else "       -"


def print_table(title: str, figures: list[Figure], floor: Figure | None) -> None:
    print(f"\n{title}")
    head = (
        f"{'figure':<44} {'images/s':>9} {'ms/step':>9} {'min ms':>8} {'thr/floor':>9} {'time/floor':>10} "
        f"{'mem MiB':>8}"
    )
    print(head)
    print("-" * len(head))
    for f in figures:
        ratio = f"{f.images_per_s / floor.images_per_s:9.2f}" if floor else f"{'':>9}"
        tratio = f"{f.median_s / floor.median_s:10.2f}" if floor else f"{'':>10}"
        line = (
            f"{f.label[:44]:<44} {f.images_per_s:9.1f} {1000 * f.median_s:9.1f} {1000 * min(f.times):8.1f} "
            f"{ratio} {tratio} {fmt_mem(f)}"
        )
        if f.first_s - f.median_s > 1.0 and f.first_s > 2 * f.median_s:
            line += f"  (first call {f.first_s:.1f}s)"
        print(line)


def check(name: str, value: float | None, target: str, ok: bool | None, note: str = "") -> dict[str, Any]:
    return {"target": name, "value": value, "required": target, "met": ok, "note": note}


def targets(result: dict[str, Any], figs: dict[str, Figure], prec: dict[str, Figure]) -> list[dict]:
    out = []
    floor = figs["floor"]
    for m, need in TARGET_THROUGHPUT.items():
        if m in figs:
            r = figs[m].images_per_s / floor.images_per_s
            out.append(check(f"{m} step throughput / floor", r, f">= {need}", r >= need))
    if "search" in figs:
        r = figs["search"].median_s / floor.median_s
        out.append(check("search step time / floor", r, f"<= {TARGET_SEARCH_TIME}", r <= TARGET_SEARCH_TIME))
    if "data" in figs:
        fastest = max((figs[k] for k in ("student", "floor") if k in figs), key=lambda f: f.images_per_s)
        r = figs["data"].images_per_s / fastest.images_per_s
        note = f"vs the fastest training step ({fastest.name}, {fastest.images_per_s:.0f} images/s)"
        out.append(check("data pipeline / training step", r, f">= {TARGET_DATA}", r >= TARGET_DATA, note))
    for name in ("floor", "dfa"):
        a, b = prec.get(f"{name}:fp32"), prec.get(f"{name}:bf16+channels_last")
        if a and b:
            r = b.images_per_s / a.images_per_s
            label = f"{name} bf16+channels_last / fp32 ({result['device']})"
            out.append(check(label, r, f">= {TARGET_BF16}", r >= TARGET_BF16))
    proj = result.get("projection_240_epochs_min")
    if proj is not None:
        gpu = result["machine"].get("gpu", "")
        on_h100 = "H100" in gpu
        note = f"projected on {gpu or result['device']}" + ("" if on_h100 else " (not an H100: no verdict)")
        out.append(
            check(
                "240-epoch dfa distillation (min)",
                proj,
                f"< {TARGET_H100_MIN} on one H100",
                (proj < TARGET_H100_MIN) if on_h100 else None,
                note,
            )
        )
    return out


def projection(
    figs: dict[str, Figure], epochs: int = 240, train: int = 50_000, test: int = 10_000
) -> float | None:
    """Minutes for ``epochs`` epochs of dfa distillation on CIFAR-100 (training steps + data + evaluation)."""
    if not all(k in figs for k in ("dfa", "data", "eval")):
        return None
    per_epoch = train / figs["dfa"].images_per_s + train / figs["data"].images_per_s
    per_epoch += test / figs["eval"].images_per_s
    return epochs * per_epoch / 60


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--classes", type=int, default=100, help="number of classes (CIFAR-100: 100)")
    p.add_argument("--batch", type=int, default=64, help="training batch size (default 64)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="main table's precision; auto = the package's rule (bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument(
        "--channels-last",
        default="auto",
        choices=("auto", "true", "false"),
        help="main table's memory format; auto = the package's rule (on for CUDA)",
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        choices=("default", "reduce-overhead", "max-autotune"),
        help="torch.compile each training step's loss (as runtime.compile does) and the teacher forward, "
        "in this mode (bare --compile: default; reduce-overhead: CUDA graphs)",
    )
    p.add_argument(
        "--methods",
        default=",".join(ALL_METHODS),
        help="comma-separated method specs (a spec may combine: dfa+kd)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 3 on CPU, 20 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per figure, >= 1 (default 1 / 5)")
    p.add_argument("--eval-images", type=int, default=None, help="default: 1024 on CPU, 10000 on CUDA")
    p.add_argument("--eval-batch", type=int, default=config.DEFAULTS["runtime"]["eval_batch_size"])
    p.add_argument("--data-images", type=int, default=50_000, help="synthetic uint8 training split size")
    p.add_argument("--data-batches", type=int, default=None, help="batches per data timing (200 / 1 epoch)")
    p.add_argument(
        "--compare-modes",
        default="fp32,bf16+channels_last",
        help="precision section modes, from fp32, bf16, fp32+channels_last, bf16+channels_last; "
        "'' skips the section",
    )
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--json", default="bench/last_run.json", help="where to write the figures ('' = nowhere)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument(
        "--demo-dag",
        action="store_true",
        help="instead of the table: time `snakemake --cores N` of config/config.yaml end to end",
    )
    p.add_argument("--dag-cores", type=int, default=2)
    p.add_argument("--dag-config", default="config/config.yaml")
    p.add_argument("--keep-dag-results", action="store_true")
    return p.parse_args(argv)


def parse_mode(text: str) -> Mode:
    parts = set(text.split("+"))
    precision = "bf16" if "bf16" in parts else "fp32"
    if not parts <= {"fp32", "bf16", "channels_last"}:
        raise SystemExit(f"unknown mode {text!r} in --compare-modes")
    return Mode(precision, "channels_last" in parts)


def run_table(args: argparse.Namespace) -> dict[str, Any]:
    cfg = copy.deepcopy(config.DEFAULTS)
    cfg["runtime"].update(device=args.device, threads=args.threads)
    cfg["runtime"]["precision"] = args.precision
    cfg["runtime"]["channels_last"] = {"auto": "auto", "true": True, "false": False}[args.channels_last]
    device = setup(cfg)  # the package's own resolution of auto precision / channels_last, seeds, cudnn
    main_mode = Mode(cfg["runtime"]["precision"], bool(cfg["runtime"]["channels_last"]))
    cuda = device.type == "cuda"
    repeats = args.repeats or (20 if cuda else 3)
    warmup = max(1, args.warmup if args.warmup is not None else (5 if cuda else 1))
    eval_images = args.eval_images or (10_000 if cuda else 1024)
    verbose = not args.quiet
    result: dict[str, Any] = {
        "machine": machine_info(device),
        "device": device.type,
        "pair": f"{args.teacher} -> {args.student}",
        "batch": args.batch,
        "mode": main_mode.name,
        "compile": args.compile,
        "repeats": repeats,
        "warmup": warmup,
        "eval_images": eval_images,
        "eval_batch": args.eval_batch,
    }
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dfakd-bench-") as tmp:
        bench = Bench(args, device, Path(tmp))
        specs = [s.strip() for s in args.methods.split(",") if s.strip()]
        for spec in specs:
            methods.parse_method(spec)  # fail early on a typo
        if verbose:
            print(
                f"benchmark: {result['pair']}, batch {args.batch}, {device}, {main_mode.name}, "
                f"{warmup} warm-up + {repeats} rounds",
                file=sys.stderr,
                flush=True,
            )
        main = [
            bench.train_figure("student", "(a) student step, CE only", "vanilla", main_mode),
            bench.teacher_figure(main_mode),
            bench.train_figure("floor", "(c) floor: student step + teacher forward", "floor", main_mode),
            *[bench.train_figure(s, f"(d) {s} step", s, main_mode) for s in specs],
            bench.search_figure(main_mode),
        ]
        measure(main, device, warmup, repeats, verbose)
        n_data = args.data_batches or (10**9 if cuda else 200)
        passes = [
            bench.eval_figure(main_mode, eval_images, args.eval_batch),
            *(
                [bench.eval_figure(main_mode, eval_images, args.batch, name="eval_train_batch")]
                if args.batch != args.eval_batch
                else []
            ),
            bench.data_figure(main_mode, args.data_images, n_data),
        ]
        measure(passes, device, warmup, repeats, verbose)
        figs = {f.name: f for f in main + passes}
        floor = figs["floor"]
        result["figures"] = [f.as_dict(floor) for f in main + passes]

        prec: dict[str, Figure] = {}
        modes = [parse_mode(m) for m in args.compare_modes.split(",") if m.strip()]
        if modes:
            pfigs = []
            for mode in modes:
                pfigs.append(bench.train_figure("floor", f"floor, {mode.name}", "floor", mode))
                if "dfa" in specs:
                    pfigs.append(bench.train_figure("dfa", f"dfa step, {mode.name}", "dfa", mode))
            if verbose:
                print("precision section", file=sys.stderr, flush=True)
            measure(pfigs, device, warmup, repeats, verbose)
            prec = {f"{f.name}:{f.mode}": f for f in pfigs}
            base = {f.name: f for f in pfigs if f.mode == modes[0].name}
            key = "throughput_vs_" + modes[0].name
            result["precision"] = [
                {**f.as_dict(None), key: f.images_per_s / base[f.name].images_per_s} for f in pfigs
            ]
    result["projection_240_epochs_min"] = projection(figs)
    result["targets"] = targets(result, figs, prec)
    result["machine"]["load_average_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - t_start

    m = result["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads)"
    print(f"\ndfakd benchmark: {result['pair']}, batch {args.batch}, {device} [{where}], torch {m['torch']}")
    print(
        f"median of {repeats} round-robin rounds after {warmup} warm-up step(s); load average "
        f"{m['load_average_start'][0]:.2f} at start, {m['load_average_end'][0]:.2f} at end"
    )
    mem_note = "CUDA max_memory_allocated above the step's start" if cuda else "CPU RSS rise, sampled"
    compiled_note = f", compiled {args.compile}" if args.compile else ""
    print_table(
        f"main table ({main_mode.name}{compiled_note}; mem: {mem_note})",
        main + passes,
        floor,
    )
    if prec:
        pf = list(prec.values())
        print_table(
            f"precision section (vs the floor in {modes[0].name})", pf, prec[f"floor:{modes[0].name}"]
        )
    if result["projection_240_epochs_min"] is not None:
        minutes = result["projection_240_epochs_min"]
        print(
            f"\nprojection, 240 epochs of dfa on CIFAR-100 (50k train + 10k eval each) on this device: "
            f"{minutes:.1f} min"
        )
    print("\ntargets (benchmarks, not tests):")
    for t in result["targets"]:
        verdict = {True: "MET", False: "NOT MET", None: "n/a"}[t["met"]]
        print(
            f"  {t['target']:<48} {t['value']:8.2f}  required {t['required']:<22} {verdict}"
            + (f"  [{t['note']}]" if t["note"] else "")
        )
    print(f"\nwall time {result['wall_s']:.0f}s")
    return result


def run_demo_dag(args: argparse.Namespace) -> dict[str, Any]:
    """``snakemake --cores N`` of the demo config, end to end, in a fresh temporary results folder."""
    snakemake = shutil.which("snakemake") or str(Path(sys.executable).parent / "snakemake")
    tmp = Path(tempfile.mkdtemp(prefix="dfakd-demo-dag-"))
    cmd = [
        snakemake,
        "--cores",
        str(args.dag_cores),
        "--configfile",
        args.dag_config,
        "--config",
        f"results_dir={tmp / 'results'}",
    ]
    info = machine_info(torch.device("cpu"))
    print(f"timing: {' '.join(cmd)}  (log: {tmp / 'snakemake.log'})", file=sys.stderr, flush=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    t0 = time.perf_counter()
    with open(tmp / "snakemake.log", "w") as log:
        rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    info["load_average_end"] = os.getloadavg()
    jobs = sum(1 for _ in (tmp / "results").rglob("result.json")) if (tmp / "results").is_dir() else 0
    result = {
        "machine": info,
        "command": " ".join(cmd),
        "returncode": rc,
        "wall_s": wall,
        "result_json_files": jobs,
        "target": {"required": f"<= {TARGET_DAG_S:.0f} s", "met": rc == 0 and wall <= TARGET_DAG_S},
    }
    print(
        f"demo DAG: rc {rc}, {wall:.0f}s end to end ({wall / 60:.1f} min), {jobs} result.json files; "
        f"load average {info['load_average_start'][0]:.2f} -> {info['load_average_end'][0]:.2f}; "
        f"target <= 10 min {'MET' if result['target']['met'] else 'NOT MET'}"
    )
    if rc != 0:
        print((tmp / "snakemake.log").read_text()[-3000:], file=sys.stderr)
    if args.keep_dag_results or rc != 0:
        print(f"results kept in {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run_demo_dag(args) if args.demo_dag else run_table(args)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return 0 if result.get("returncode", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
