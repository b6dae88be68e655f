"""``dfakd evaluate`` (a saved model on the test split) and ``dfakd import-teacher`` (a community
checkpoint into this package's layout)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from dfakd import data, models
from dfakd.errors import DfakdError
from dfakd.files import atomic_save, atomic_write_json, check_output_file, load_checkpoint
from dfakd.jobs.common import load_model, sha256_of, test_stream
from dfakd.models.state import extract_state_dict, load_state_strict
from dfakd.training.loop import evaluate
from dfakd.training.runtime import prepare_module, setup


def evaluate_checkpoint(
    cfg: dict[str, Any], checkpoint: str | Path, out: str | Path | None
) -> dict[str, Any]:
    """Top-1/top-5/loss of a saved model on the configured test split, as JSON."""
    if out is not None:
        check_output_file(out, "output file (-o)")
    device = setup(cfg)
    model, meta = load_model(checkpoint, device)
    n_classes = data.num_classes(cfg["dataset"])
    if meta["num_classes"] != n_classes:
        raise DfakdError(
            f"{checkpoint} has {meta['num_classes']} classes, dataset {cfg['dataset']['name']} {n_classes}"
        )
    model = prepare_module(model, device, cfg["runtime"]["channels_last"])
    metrics = evaluate(model, test_stream(cfg, device), cfg["runtime"]["precision"])
    result = {
        "checkpoint": str(checkpoint),  # as given; the digest names it wherever the folder is copied
        "checkpoint_sha256": sha256_of(checkpoint),
        "arch": meta["arch"],
        "dataset": cfg["dataset"]["name"],
        **metrics,
    }
    if out is not None:
        atomic_write_json(out, result)
        if cfg["tracking"]["enabled"]:
            from dfakd.tracking import log_evaluation

            problem = log_evaluation(out)  # into a job's folder: to its MLflow run, best-effort
            if problem and Path(out).name == "eval.json" and (Path(out).parent / "mlflow_run.json").is_file():
                print(f"dfakd evaluate: warning: {out} not sent to MLflow: {problem}", file=sys.stderr)
    return result


def import_teacher(
    source: str | Path, arch: str, num_classes: int, out: str | Path, sha256: str | None = None
) -> dict[str, Any]:
    """A community checkpoint (``{'model': sd}``) -> our layout, loaded strictly."""
    source = Path(source)
    if not source.is_file():
        raise DfakdError(f"checkpoint not found: {source}")
    check_output_file(out, "output file (--out)")
    if sha256 is not None:
        actual = sha256_of(source)
        if actual != sha256.lower():
            raise DfakdError(f"sha256 of {source} is {actual}, expected {sha256}")
    model = models.build(arch, num_classes)
    load_state_strict(model, extract_state_dict(load_checkpoint(source), source), str(source), arch)
    atomic_save(
        {"model": model.state_dict(), "arch": arch, "num_classes": num_classes, "imported_from": str(source)},
        out,
    )
    return {
        "arch": arch,
        "num_classes": num_classes,
        "out": str(out),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
