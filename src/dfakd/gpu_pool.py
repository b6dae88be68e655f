"""Pin a job to one GPU of a local pool, so that N parallel jobs on an N-GPU machine share the GPUs.

Snakemake limits how many GPU jobs run at once (``--resources gpu=N``) but does not say which GPU each
job gets. With ``DFAKD_GPU_POOL=N`` in its environment (the workflow sets it from ``local_gpus``), a job
that asks for a GPU (``DFAKD_JOB_GPUS``, the rule's ``gpu`` resource, unset or > 0) takes the first free
slot among N lock files (``flock``, released by the OS when the process ends,
even on SIGKILL) and sets ``CUDA_VISIBLE_DEVICES`` to that GPU before CUDA is initialized. A
``CUDA_VISIBLE_DEVICES`` already set (e.g. by SLURM) lists the GPUs the pool draws from.
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
    lock_dir = Path(environ.get("DFAKD_GPU_LOCK_DIR") or f"/tmp/dfakd-gpu-locks-{os.getuid()}")
    lock_dir.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for device in devices:
            fd = os.open(lock_dir / f"gpu{device}.lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            _held.append(fd)
            environ["CUDA_VISIBLE_DEVICES"] = device
            print(
                f"dfakd: pinned to GPU {device} (CUDA_VISIBLE_DEVICES={device})", file=sys.stderr, flush=True
            )
            return device
        if not waited:
            print(
                f"dfakd: all {len(devices)} GPUs of the pool are busy; waiting", file=sys.stderr, flush=True
            )
            waited = True
        time.sleep(poll_s)
