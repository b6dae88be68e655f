"""Device selection, seeding, precision and progress output shared by every job."""

from __future__ import annotations

import contextlib
import platform
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dfakd.errors import DfakdError

#: what ``platform.machine()`` says on the CPUs where channels-last was measured faster in fp32
X86_64 = ("x86_64", "amd64")


def select_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA where there is none is a clear error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DfakdError(
                f"runtime.device is {requested!r} but no CUDA device is available here; use auto or cpu"
            )
        index = int(requested.split(":")[1]) if ":" in requested else 0
        if index >= torch.cuda.device_count():
            raise DfakdError(
                f"runtime.device is {requested!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return torch.device(requested)


def setup(cfg: dict[str, Any]) -> torch.device:
    """Threads, determinism, seeds and the device; resolves ``auto`` precision and memory format in
    ``cfg`` (so the saved ``config.yaml`` says what ran)."""
    runtime = cfg["runtime"]
    if runtime["threads"]:
        torch.set_num_threads(runtime["threads"])
    if runtime["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    seed_everything(cfg["seed"])
    device = select_device(runtime["device"])
    # CUDA: bf16 autocast and channels-last (accuracy parity with fp32 not yet measured there). x86-64 CPU:
    # fp32 with channels-last, 1.24x faster on the demo DAG and within the seed spread of contiguous fp32 in
    # its 5-seed parity check (docs/BENCHMARKS.md, 2026-12-02 evening); other CPUs are unmeasured and stay
    # contiguous. bf16 stays an opt-in on a CPU: run end to end in bf16 the demo's OFD and DFA students lost
    # 0.3-0.8 points, beyond the seed spread (`bf16_hint`, said once a job has opened: a refused input
    # prints its one line alone)
    if runtime["precision"] == "auto":
        runtime["precision"] = "bf16" if device.type == "cuda" else "fp32"
    if runtime["channels_last"] == "auto":
        runtime["channels_last"] = device.type == "cuda" or platform.machine().lower() in X86_64
    if runtime["finite_check_every"] == 0:
        # reading a loss back waits for the GPU; on the CPU it costs nothing
        runtime["finite_check_every"] = 50 if device.type == "cuda" else 1
    return device


def cpu_has_native_bf16() -> bool:
    """AMX tiles or AVX512-BF16 (``False`` where this torch cannot tell)."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except Exception:  # noqa: BLE001 -- a probe that fails says nothing: fp32
            continue
    return False


def bf16_hint(runtime: dict[str, Any], device: torch.device) -> str | None:
    """The one line that names the bf16 opt-in, for an fp32 job on a CPU with native bf16."""
    if device.type == "cpu" and runtime["precision"] == "fp32" and cpu_has_native_bf16():
        opt_in = "--set runtime.precision=bf16" + (
            "" if runtime["channels_last"] else " --set runtime.channels_last=true"
        )
        return (
            f"this CPU has native bf16 (AMX or AVX512-BF16): {opt_in} trains 1.3-2.5x faster, but the demo "
            "run end to end in bf16 lost 0.3-0.8 points on its OFD and DFA students (docs/BENCHMARKS.md)"
        )
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compile_mode(setting: bool | str) -> str | None:
    """``runtime.compile`` as a torch.compile mode: None (off), ``default``, ``reduce-overhead`` (CUDA
    graphs: static shapes, which the training stream gives by dropping the last incomplete batch) or
    ``max-autotune``; ``true`` is ``default``."""
    if setting is False:
        return None
    return "default" if setting is True else str(setting)


def compiled(fn: Callable, mode: str | None) -> Callable:
    """``fn`` under torch.compile in ``mode`` (``fn`` itself when ``mode`` is None)."""
    return fn if mode is None else torch.compile(fn, mode=mode)


def prepare_module(module: torch.nn.Module, device: torch.device, channels_last: bool) -> torch.nn.Module:
    module = module.to(device)
    return module.to(memory_format=torch.channels_last) if channels_last else module


class Progress:
    """A progress bar on a terminal (redrawn at most every 0.2 s); one line every ``every`` steps in a
    log file. The text is a callable, evaluated only when a line is shown (it may read GPU values)."""

    def __init__(self, total: int, label: str, every: int) -> None:
        self.total, self.label, self.every = total, label, every
        self.tty = sys.stderr.isatty()
        self.start = self.shown = time.perf_counter()

    def update(self, step: int, text: Callable[[], str]) -> None:
        done = step + 1
        now = time.perf_counter()
        if self.tty:
            if now - self.shown < 0.2 and done != self.total:
                return
            self.shown = now
            width = 24
            filled = int(width * done / max(1, self.total))
            bar = "#" * filled + "." * (width - filled)
            sys.stderr.write(f"\r{self.label} [{bar}] {done}/{self.total} {text()}")
            if done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif done % self.every == 0 or done == self.total:
            rate = done / max(1e-9, now - self.start)
            print(
                f"{self.label} step {done}/{self.total} {text()} ({rate:.1f} it/s)",
                file=sys.stderr,
                flush=True,
            )


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
