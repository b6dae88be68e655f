"""Shared fixtures: datasets in their real on-disk formats, tiny job configs, and a CLI runner.

CIFAR and md5 sums
------------------
torchvision's ``CIFAR10``/``CIFAR100`` refuse a folder unless every batch file's md5 equals the digest of
the official file (``_check_integrity`` -> ``utils.check_integrity(path, md5)`` -> ``calculate_md5``), and
``_load_meta`` does the same for ``meta``/``batches.meta``. Those digests are of the real 160 MB archive's
contents; a small synthetic file cannot have them (that would be an MD5 preimage), and the real data cannot
be fetched here. So the check cannot be satisfied honestly by the fixture files alone.

What the fixture does instead: it writes the files in the exact official format, computes *their* md5
sums, and puts those sums into torchvision's class-level checksum tables (``train_list``, ``test_list``,
``meta['md5']``) with ``monkeypatch`` (undone after the test). Nothing else is replaced: torchvision's own
``_check_integrity``, ``check_integrity``, ``calculate_md5``, pickle decoding, CHW->HWC reshaping and
``_load_meta`` all run, and the integrity check still really verifies the files (a truncated or edited
fixture file is still refused, see ``test_data.py``). Our loader is called unchanged and reaches
torchvision's real class through ``torchvision.datasets.CIFAR100``. ``cifar100_unpatched`` writes the same
files without touching the tables, to test that the real digests refuse them with our error message.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

# ---------------------------------------------------------------------------------------------- CIFAR


@dataclass
class CifarFiles:
    """What a CIFAR fixture wrote: ``root`` (the folder given as ``dataset.root``) and the raw arrays."""

    root: Path
    folder: Path
    train_data: np.ndarray  # (N, 3072) uint8, row-major CHW: 1024 R, then 1024 G, then 1024 B
    train_labels: list[int]
    test_data: np.ndarray
    test_labels: list[int]
    classes: list[str]
    md5: dict[str, str] = field(default_factory=dict)  # file name -> md5 of what was written


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _dump(obj: dict[str, Any], path: Path) -> None:
    # protocol 2 like the official (Python 2 era) files; torchvision reads with encoding="latin1"
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar100(root: Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> CifarFiles:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine_names = [f"fine{i:02d}" for i in range(100)]
    coarse_names = [f"coarse{i:02d}" for i in range(20)]
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        coarse = [v // 5 for v in fine]
        _dump(
            {
                "filenames": [f"img_{split}_{i}.png" for i in range(n)],
                "batch_label": f"{split}ing batch 1 of 1",
                "fine_labels": fine,
                "coarse_labels": coarse,
                "data": data,
            },
            folder / split,
        )
        arrays[split] = (data, fine)
    _dump({"fine_label_names": fine_names, "coarse_label_names": coarse_names}, folder / "meta")
    return CifarFiles(
        root=root,
        folder=folder,
        train_data=arrays["train"][0],
        train_labels=arrays["train"][1],
        test_data=arrays["test"][0],
        test_labels=arrays["test"][1],
        classes=fine_names,
        md5={name: _md5(folder / name) for name in ("train", "test", "meta")},
    )


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 6, seed: int = 1) -> CifarFiles:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    train_data, train_labels = [], []
    batches = [(f"data_batch_{i}", per_batch, f"training batch {i} of 5") for i in range(1, 6)]
    for fname, n, label in [*batches, ("test_batch", n_test, "testing batch 1 of 1")]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        _dump(
            {
                "batch_label": label,
                "labels": labels,
                "data": data,
                "filenames": [f"{fname}_{i}.png" for i in range(n)],
            },
            folder / fname,
        )
        if fname == "test_batch":
            test_data, test_labels = data, labels
        else:
            train_data.append(data)
            train_labels.extend(labels)
    _dump({"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072}, folder / "batches.meta")
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    return CifarFiles(
        root=root,
        folder=folder,
        train_data=np.concatenate(train_data),
        train_labels=train_labels,
        test_data=test_data,
        test_labels=test_labels,
        classes=names,
        md5={name: _md5(folder / name) for name in files},
    )


def use_fixture_md5s(monkeypatch: pytest.MonkeyPatch, files: CifarFiles, cls: type) -> None:
    """Point torchvision's checksum tables (data, not code) at the fixture files' real md5 sums."""
    monkeypatch.setattr(cls, "train_list", [[name, files.md5[name]] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, files.md5[name]] for name, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": files.md5[cls.meta["filename"]]})


@pytest.fixture
def cifar100_unpatched(tmp_path: Path) -> CifarFiles:
    return write_cifar100(tmp_path / "cifar")


@pytest.fixture
def cifar100(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CifarFiles:
    from torchvision.datasets import CIFAR100

    files = write_cifar100(tmp_path / "cifar")
    use_fixture_md5s(monkeypatch, files, CIFAR100)
    return files


@pytest.fixture
def cifar10(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CifarFiles:
    from torchvision.datasets import CIFAR10

    files = write_cifar10(tmp_path / "cifar10")
    use_fixture_md5s(monkeypatch, files, CIFAR10)
    return files


# ------------------------------------------------------------------------------------------ ImageFolder


@dataclass
class FolderFiles:
    root: Path
    classes: list[str]
    # split -> list of (path, class index, HWC uint8 array), in ImageFolder's (sorted) order
    images: dict[str, list[tuple[Path, int, np.ndarray]]]


# per-class colour shift over mid-grey; with the noise below the classes overlap, so accuracy and loss
# keep moving from epoch to epoch (a task learnt perfectly in one epoch would make metric checks weak)
CLASS_SHIFTS = [(14, -7, -7), (-7, 14, -7), (-7, -7, 14), (10, 10, -20), (-20, 10, 10)]


def write_imagefolder(
    root: Path, n_classes: int = 3, n_train: int = 8, n_test: int = 4, size: int = 32, seed: int = 0
) -> FolderFiles:
    """Small RGB PNGs, ``root/{train,test}/<class>/<i>.png``; each class has its own colour cast under
    strong noise, so a tiny network learns them, but not at once."""
    rng = np.random.default_rng(seed)
    classes = [f"class_{c}" for c in "abcdefghij"[:n_classes]]
    images: dict[str, list[tuple[Path, int, np.ndarray]]] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images[split] = []
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            base = 128 + np.array(CLASS_SHIFTS[c % len(CLASS_SHIFTS)], dtype=np.int16)
            for i in range(n):
                cast = rng.integers(-20, 21, size=3)  # per-image colour cast, larger than the class shift
                noise = rng.integers(-60, 61, size=(size, size, 3))
                arr = np.clip(base + cast + noise, 0, 255).astype(np.uint8)
                path = folder / f"{i:03d}.png"
                Image.fromarray(arr, mode="RGB").save(path)
                images[split].append((path, c, arr))
    return FolderFiles(root=root, classes=classes, images=images)


@pytest.fixture
def imagefolder(tmp_path: Path) -> FolderFiles:
    return write_imagefolder(tmp_path / "imgs")


@pytest.fixture(scope="session")
def mnist5k_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dfakd.data.demo import write_mnist5k

    return write_mnist5k(tmp_path_factory.mktemp("mnist") / "mnist5k")


# -------------------------------------------------------------------------------------------- configs


def tiny_config(data_root: Path, results_dir: Path, **recipe: Any) -> dict[str, Any]:
    """A job config that trains resnet8 on a small ImageFolder in a second or two."""
    return {
        "seed": 0,
        "results_dir": str(results_dir),
        "dataset": {"name": "imagefolder", "root": str(data_root)},
        "model": {"arch": "resnet8"},
        "recipe": {"epochs": 2, "batch_size": 16, "lr": 0.05, "milestones": [1], **recipe},
        "runtime": {"device": "cpu", "eval_batch_size": 64, "log_every": 1},
        "tracking": {"enabled": False},
    }


@pytest.fixture
def tiny_cfg(imagefolder: FolderFiles, tmp_path: Path) -> dict[str, Any]:
    return tiny_config(imagefolder.root, tmp_path / "results")


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ----------------------------------------------------------------------------------------------- CLI


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m dfakd ARGS`` in a fresh interpreter, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "dfakd", *map(str, args)],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


#: the kill-and-resume matrix of the train, search and distill tests: (signal, runtime.precision). fp32
#: with the `auto` memory format (channels-last on x86-64, contiguous elsewhere); bf16 (autocast with
#: channels-last: what `auto` picks on CUDA, an opt-in on a CPU) with SIGTERM only, the mid-epoch save,
#: which restores the most state
INTERRUPTIONS = [(signal.SIGKILL, "fp32"), (signal.SIGTERM, "fp32"), (signal.SIGTERM, "bf16")]
INTERRUPTION_IDS = ["SIGKILL", "SIGTERM", "SIGTERM-bf16"]


@pytest.fixture(autouse=True)
def _no_ambient_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their own tracking store; an ``MLFLOW_TRACKING_URI`` from the shell must not leak in."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def one_line_error(proc: subprocess.CompletedProcess, verb: str) -> str:
    """Exit code 2 and exactly one stderr line ``dfakd VERB: error: ...``, no traceback; returns the line."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"dfakd {verb}: error: "), lines[0]
    return lines[0]


def average_aggregation(folder: Path, teacher_arch: str, student_arch: str, classes: int) -> str:
    """Write the ``average`` aggregation of a pair (every candidate of every matched group) to a file."""
    from dfakd import models
    from dfakd.methods import aggregation as agg_mod
    from dfakd.methods.base import match_groups

    teacher, student = models.build(teacher_arch, classes), models.build(student_arch, classes)
    path = folder / "average.yaml"
    agg_mod.fixed(teacher_arch, match_groups(teacher, student), "average").save(path)
    return str(path)
