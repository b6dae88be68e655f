"""SIGTERM (what SLURM sends on pre-emption or at the time limit): finish the current step, save a
checkpoint, and exit; a rerun resumes from that step."""

from __future__ import annotations

import contextlib
import signal
import threading

from dfakd.errors import DfakdError

EXIT_CODE = 143  # 128 + SIGTERM, what a job killed by SIGTERM reports


class Preempted(DfakdError):
    """Raised after the checkpoint is saved; the CLI exits with :data:`EXIT_CODE`."""


class StopFlag:
    def __init__(self) -> None:
        self.requested = False

    def _handler(self, signum, frame) -> None:
        self.requested = True


@contextlib.contextmanager
def stop_on_sigterm():
    """Yields a flag that turns true on SIGTERM (handler installed only in the main thread)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, flag._handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)
