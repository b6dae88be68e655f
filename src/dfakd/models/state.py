"""Model weights in and out of checkpoints: ``{'model': state_dict}`` files of this package and of the
community (RepDistiller/mdistiller), loaded strictly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dfakd.errors import DfakdError


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
