"""Pin a job to one GPU of a local pool, so that parallel jobs on an N-GPU machine share the GPUs.

Snakemake limits how many GPU jobs run at once (``--resources gpu=N*K``) but does not say which GPU each
job gets. With ``DFAKD_GPU_POOL=N`` in its environment (the workflow sets it from ``local_gpus``), a job
that asks for a GPU (``DFAKD_JOB_GPUS``, the rule's ``gpu`` resource, unset or > 0) takes the first free
slot among the pool's lock files (``flock``, released by the OS when the process ends, even on SIGKILL)
and sets ``CUDA_VISIBLE_DEVICES`` to that slot's GPU before CUDA is initialized. Each GPU has
``DFAKD_GPU_SLOTS=K`` slots (default 1; the workflow sets it from ``local_gpu_slots``), lock files
``gpu{d}.slot{k}.lock``: K jobs share a GPU, the slots are filled GPU by GPU round (every GPU's first slot
before any second one). A ``CUDA_VISIBLE_DEVICES`` already set (e.g. by SLURM) lists the GPUs the pool
draws from.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import MutableMapping
from pathlib import Path

_held: list[int] = []  # lock file descriptors, kept open for the life of the process


def claim(environ: MutableMapping[str, str] | None = None, poll_s: float = 0.5) -> str | None:
    """Claim a free GPU of the pool; returns the device id put in ``CUDA_VISIBLE_DEVICES`` (or None)."""
    environ = os.environ if environ is None else environ
    pool = int(environ.get("DFAKD_GPU_POOL", "0") or 0)
    if pool <= 0 or int(environ.get("DFAKD_JOB_GPUS", "1") or 0) <= 0:
        return None
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    devices = visible[:pool] if visible else [str(i) for i in range(pool)]
    slots = max(1, int(environ.get("DFAKD_GPU_SLOTS", "1") or 1))
    lock_dir = Path(environ.get("DFAKD_GPU_LOCK_DIR") or f"/tmp/dfakd-gpu-locks-{os.getuid()}")
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for slot, device in ((k, d) for k in range(slots) for d in devices):
            fd = os.open(lock_dir / f"gpu{device}.slot{slot}.lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            _held.append(fd)
            environ["CUDA_VISIBLE_DEVICES"] = device
            share = f", slot {slot + 1} of {slots}" if slots > 1 else ""
            print(
                f"dfakd: pinned to GPU {device} (CUDA_VISIBLE_DEVICES={device}{share})",
                file=sys.stderr,
                flush=True,
            )
            return device
        if not waited:
            print(
                f"dfakd: all {len(devices) * slots} GPU slots of the pool are busy; waiting",
                file=sys.stderr,
                flush=True,
            )
            waited = True
        time.sleep(poll_s)
