"""``dfakd prepare-data``: write a demo dataset (``mnist5k``, ``mnist5k-cluttered``), or check (and for
CIFAR, optionally download) a dataset.

ImageFolder datasets (``cinic10``, ``imagefolder``) are only checked: every split present is decoded
through the same loader training uses (:func:`dfakd.data.datasets.load_split`), so each of its checks
runs, and nothing is written.

Every split it reads is reported with a content digest (:func:`split_digest`: the decoded pixels, labels
and class names, not the files), so two machines, or two sessions, can tell whether they train on the
same data whatever the directory listing order, timestamps or PNG encoder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from dfakd.data.datasets import CIFAR_DIRS, MANUAL_ARCHIVES, ImageSplit, fetch_hint, load_split
from dfakd.errors import DfakdError

# ImageFolder splits checked by prepare-data: (required, optional)
IMAGEFOLDER_SPLITS = {"cinic10": (("train", "test"), ("valid",)), "imagefolder": (("train", "test"), ())}
SHOWN_CLASSES = 12


def _class_list(classes: list[str]) -> str:
    shown = ", ".join(classes[:SHOWN_CLASSES])
    return shown + (f", ... ({len(classes) - SHOWN_CLASSES} more)" if len(classes) > SHOWN_CLASSES else "")


def split_digest(split: ImageSplit) -> str:
    """sha256 (16 hex digits) of a decoded split: class names, image shape, labels and pixels in order."""
    digest = hashlib.sha256()
    digest.update("\0".join(split.classes).encode() + b"\1")
    digest.update(repr(tuple(split.images.shape)).encode())
    digest.update(split.labels.contiguous().numpy().astype("<i8").tobytes())
    digest.update(split.images.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def describe_split(name: str, split: str, loaded: ImageSplit) -> str:
    present = sorted({loaded.classes[i] for i in loaded.labels.unique().tolist()})
    lacks = [c for c in loaded.classes if c not in present]
    _, _, h, w = loaded.images.shape
    note = f"; lacks {_class_list(lacks)}" if lacks else ""
    return (
        f"{name} {split}: {len(loaded)} images ({w}x{h}), {len(present)} of {len(loaded.classes)} "
        f"classes ({_class_list(present)}){note}; content sha256 {split_digest(loaded)}"
    )


def check_imagefolder(name: str, root: str | Path, echo: Callable[[str], None] = print) -> dict[str, int]:
    """Decode every split of an ImageFolder dataset under ``root`` and report it; writes nothing.
    Returns the image count per split; any problem is a :class:`DfakdError`."""
    root = Path(root)
    required, optional = IMAGEFOLDER_SPLITS[name]
    if not root.is_dir():
        hint = f"; {fetch_hint(name, root)}" if name in MANUAL_ARCHIVES else ""
        raise DfakdError(
            f"{name}: dataset folder {root} not found (layout <root>/{{train,test}}/<class>/){hint}"
        )
    missing = [s for s in required if not (root / s).is_dir()]
    if missing:
        raise DfakdError(
            f"{name}: {root} lacks the split folder(s) {', '.join(missing)} "
            f"(layout <root>/{{{','.join(required + optional)}}}/<class>/<image>; see docs/data.md)"
        )
    cfg = {"name": name, "root": str(root)}
    counts = {}
    for split in required + tuple(s for s in optional if (root / s).is_dir()):
        loaded = load_split(cfg, split)
        echo(describe_split(name, split, loaded))
        counts[split] = len(loaded)
    echo(f"{name} in {root}: checked, nothing written")
    return counts


def prepare(
    name: str,
    root: str | Path,
    download: bool = False,
    force: bool = False,
    echo: Callable[[str], None] = print,
) -> None:
    """What ``dfakd prepare-data NAME --root ROOT`` does."""
    if name in ("mnist5k", "mnist5k-cluttered"):
        from dfakd.data.demo import write_mnist5k, write_mnist5k_cluttered

        write = write_mnist5k if name == "mnist5k" else write_mnist5k_cluttered
        written = write(root, force=force)
        for split in ("train", "test"):
            echo(describe_split(name, split, load_split({"name": name, "root": str(written)}, split)))
        echo(f"{name} ready in {written}")
        return
    if name in IMAGEFOLDER_SPLITS:
        if download:
            echo(f"{name}: --download does nothing here (no automatic download); checking {root} as it is")
        check_imagefolder(name, root, echo)
        return
    if name not in CIFAR_DIRS:
        raise DfakdError(f"prepare-data: unknown dataset {name!r}")
    cfg = {"name": name, "root": str(root), "download": download}
    for split in ("train", "test"):
        echo(describe_split(name, split, load_split(cfg, split)))
    echo(f"{name} ready in {root}")
