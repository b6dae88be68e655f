"""Atomic checkpoint writing and safe loading (``weights_only=True``, always)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from dfakd.errors import DfakdError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic(Path(path), lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    _atomic(Path(path), lambda f: torch.save(obj, f))


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


def load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``; every failure is a one-line :class:`DfakdError`."""
    path = Path(path)
    if not path.is_file():
        raise DfakdError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt / unsafe files
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            raise DfakdError(
                f"checkpoint {path} contains pickled Python objects ({found.group(1)}), refused (only "
                "tensors and plain containers are loaded, weights_only=True)"
            ) from None
        first = text.strip().splitlines()[0] if text.strip() else exc.__class__.__name__
        raise DfakdError(f"checkpoint {path} is truncated or corrupt: {first}") from None


def extract_state_dict(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """Accept ``{'model': sd}`` (RepDistiller/mdistiller and ours), ``{'state_dict': sd}`` or a bare sd."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DfakdError(
            f"checkpoint {path} holds no state_dict (expected {{'model': state_dict}} or a state_dict)"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_state_strict(
    module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, arch: str
) -> None:
    """``load_state_dict(strict=True)`` with an error that lists what does not match."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                shown = ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
                parts.append(f"{label} keys: {shown}")
        raise DfakdError(f"{source} does not fit architecture {arch!r}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
