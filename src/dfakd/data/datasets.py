"""Datasets, read from their real on-disk formats into uint8 image tensors.

- ``cifar10`` / ``cifar100``: the python-pickle batches, read by torchvision's own dataset classes
  (``root/cifar-10-batches-py`` or ``root/cifar-100-python``);
- ``cinic10`` and ``imagefolder``: ImageFolder layout ``root/{train,valid,test}/<class>/<image>``,
  listed with torchvision's ``make_dataset`` against the *training* split's class list (a ``valid/`` or
  ``test/`` class folder that ``train/`` lacks is refused; a split lacking a class keeps the training
  indices);
- ``mnist5k`` and ``mnist5k-cluttered``: the offline demo datasets, ImageFolder layout written by
  ``dfakd prepare-data`` (see :mod:`dfakd.data.demo`).

Each split is decoded once into an ``(N, 3, H, W)`` uint8 tensor plus int64 labels; batching,
augmentation and normalization then run on whole batches (:mod:`dfakd.data.stream`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfakd.errors import DfakdError

CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int | None  # None: counted from the folders (imagefolder)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    augment: str  # default training augmentation
    test_split: str  # ImageFolder split used for evaluation


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        "cifar10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "crop_flip", "test"
    ),
    "cifar100": DatasetInfo(
        "cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "crop_flip", "test"
    ),
    "cinic10": DatasetInfo(
        "cinic10", 10, (0.4789, 0.4723, 0.4305), (0.2421, 0.2383, 0.2587), "resized_crop_flip", "test"
    ),
    "mnist5k": DatasetInfo("mnist5k", 10, (0.1307,) * 3, (0.3081,) * 3, "crop_flip", "test"),
    # mean/std of its training split (docs/data.md); "crop": a mirrored digit is another glyph
    "mnist5k-cluttered": DatasetInfo("mnist5k-cluttered", 10, (0.1219,) * 3, (0.2703,) * 3, "crop", "test"),
    "imagefolder": DatasetInfo("imagefolder", None, (0.5,) * 3, (0.5,) * 3, "crop_flip", "test"),
}


@dataclass
class ImageSplit:
    """One split in memory: ``images`` uint8 (N, 3, H, W), ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, index: torch.Tensor) -> ImageSplit:
        return ImageSplit(self.images[index], self.labels[index], self.classes)


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise DfakdError(
            f"unknown dataset {name!r} (config key 'dataset.name'); available: {', '.join(DATASETS)}"
        ) from None


def num_classes(dataset_cfg: dict[str, Any]) -> int:
    info = dataset_info(dataset_cfg["name"])
    if info.num_classes is not None:
        return info.num_classes
    train_dir = Path(dataset_cfg["root"]) / "train"
    found = len(train_classes(dataset_cfg["name"], Path(dataset_cfg["root"])))
    configured = dataset_cfg.get("num_classes")
    if configured is not None and configured != found:
        # a larger count would only add output units no label ever reaches: refused like a smaller one
        raise DfakdError(
            f"config key 'dataset.num_classes' is {configured} but {train_dir} has {found} class folders "
            f"(the dataset has {found} classes): set it to {found} or leave it out"
        )
    return found


def normalization(dataset_cfg: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    info = dataset_info(dataset_cfg["name"])
    mean = tuple(dataset_cfg["mean"]) if dataset_cfg.get("mean") else info.mean
    std = tuple(dataset_cfg["std"]) if dataset_cfg.get("std") else info.std
    return mean, std


def train_augment(dataset_cfg: dict[str, Any]) -> str:
    augment = dataset_cfg.get("augment", "auto")
    return dataset_info(dataset_cfg["name"]).augment if augment == "auto" else augment


def load_split(dataset_cfg: dict[str, Any], split: str) -> ImageSplit:
    """``split`` is ``train`` or ``test`` (ImageFolder datasets may also name ``valid``)."""
    name = dataset_cfg["name"]
    dataset_info(name)
    root = Path(dataset_cfg["root"])
    if name in CIFAR_DIRS:
        return _load_cifar(name, root, split == "train", bool(dataset_cfg.get("download")))
    return _load_imagefolder(name, root, split)


#: datasets fetched by hand: (archive, where to get it, what unpacking it into the root creates)
MANUAL_ARCHIVES = {
    "cifar10": (
        "cifar-10-python.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar.html",
        "cifar-10-batches-py",
    ),
    "cifar100": (
        "cifar-100-python.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar.html",
        "cifar-100-python",
    ),
    "cinic10": ("CINIC-10.tar.gz", "https://datashare.ed.ac.uk/handle/10283/3192", "train, valid, test"),
}


def fetch_hint(name: str, root: str | Path) -> str:
    """How to fetch a dataset by hand: the archive, where to get it, the exact folder to unpack it into."""
    archive, url, creates = MANUAL_ARCHIVES[name]
    auto = " (or set download: true where there is internet)" if name in CIFAR_DIRS else ""
    return (
        f"download {archive} from {url} and unpack it into {Path(root).resolve()} (it creates {creates} "
        f"there){auto}"
    )


def missing_manual_dataset(dataset_cfg: dict[str, Any]) -> str | None:
    """Why a dataset that must be fetched by hand cannot be used yet (its folder is missing), with how to
    fetch it; None when it is there, downloads itself, or is not such a dataset."""
    name, root = dataset_cfg["name"], Path(dataset_cfg["root"])
    if name not in MANUAL_ARCHIVES or (name in CIFAR_DIRS and dataset_cfg.get("download")):
        return None
    present = (root / CIFAR_DIRS[name]).is_dir() if name in CIFAR_DIRS else (root / "train").is_dir()
    if present:
        return None
    return f"{name}: dataset folder {root} not found; {fetch_hint(name, root)}"


def _load_cifar(name: str, root: Path, train: bool, download: bool) -> ImageSplit:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        ds = cls(str(root), train=train, download=download)
    except RuntimeError as exc:
        if "not found or corrupted" not in str(exc):
            raise
        raise DfakdError(
            f"{name} not found or corrupted: expected the python-pickle batches in "
            f"{root / CIFAR_DIRS[name]}; {fetch_hint(name, root)}"
        ) from None
    except OSError as exc:  # download attempted without internet
        raise DfakdError(f"{name}: download into {root} failed ({exc}); fetch the archive by hand") from None
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    return ImageSplit(images, labels, list(ds.classes))


def _require_dir(path: Path, name: str) -> None:
    if not path.is_dir():
        demo = name in ("mnist5k", "mnist5k-cluttered")
        hint = f"run `dfakd prepare-data {name} --root ROOT`" if demo else "see docs/data.md"
        raise DfakdError(
            f"{name}: missing directory {path} (ImageFolder layout <root>/<split>/<class>/; {hint})"
        )


def _class_folders(split_dir: Path) -> list[str]:
    """The class names of an ImageFolder split, as torchvision's ``find_classes`` sees them (sorted)."""
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())


def train_classes(name: str, root: Path) -> list[str]:
    """The class list every split of an ImageFolder dataset is labelled by: the folder names of
    ``root/train`` (listed, not decoded). Fewer than two classes, or another count than a named dataset
    has, is refused."""
    train_dir = root / "train"
    _require_dir(train_dir, name)
    classes = _class_folders(train_dir)
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise DfakdError(
            f"{name}: {train_dir} has {len(classes)} class folder(s) ({found}); a classifier needs at least "
            "2 (layout <root>/train/<class>/<image>)"
        )
    expected = dataset_info(name).num_classes
    if expected is not None and len(classes) != expected:
        raise DfakdError(
            f"{name}: {train_dir} has {len(classes)} class folders, {name} has {expected} classes"
        )
    return classes


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _image_files(split_dir: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """The (path, label) of every image under ``split_dir/<class>/`` (subfolders and linked folders
    included), in the order torchvision's ImageFolder lists them: classes by name, folders and files
    sorted. Written here because importing torchvision pulls in ``torch._dynamo``: some 3 s of an
    evaluation job's 7 (training jobs import it anyway, at the optimizer's first step)."""
    samples = []
    for name in sorted(class_to_idx):
        class_dir = os.path.join(split_dir, name)
        if not os.path.isdir(class_dir):
            continue
        for folder, _, files in sorted(os.walk(class_dir, followlinks=True)):
            samples += [
                (os.path.join(folder, f), class_to_idx[name])
                for f in sorted(files)
                if f.lower().endswith(IMAGE_EXTENSIONS)
            ]
    return samples


def _read_rgb(name: str, path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as exc:  # PIL raises OSError, but also SyntaxError/ValueError on broken files
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DfakdError(f"{name}: cannot read image {path} ({reason})") from None


def _reference_size(name: str, train_dir: Path, classes: list[str]) -> tuple[str, int, int]:
    """The first training image and its (width, height), read from its header only."""
    from PIL import Image

    for c in classes:
        files = _image_files(train_dir, {c: 0})
        if files:
            path = files[0][0]
            try:
                with Image.open(path) as img:
                    width, height = img.size
            except Exception as exc:
                reason = " ".join(str(exc).split()) or type(exc).__name__
                raise DfakdError(f"{name}: cannot read image {path} ({reason})") from None
            return path, width, height
    raise DfakdError(f"{name}: no images found under {train_dir}")


def _load_imagefolder(name: str, root: Path, split: str) -> ImageSplit:
    classes = train_classes(name, root)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    train_dir = root / "train"
    split_dir = root / (split if split != "test" else dataset_info(name).test_split)
    _require_dir(split_dir, name)
    if split_dir == train_dir:
        present = classes
    else:
        present = _class_folders(split_dir)
        extra = [c for c in present if c not in class_to_idx]
        if extra:
            raise DfakdError(
                f"{name}: class folder(s) {', '.join(repr(c) for c in extra)} in {split_dir} are not "
                f"classes of the training split {train_dir} (labels follow its {len(classes)} classes); "
                "remove them or add them to train/"
            )
    samples = _image_files(split_dir, {c: class_to_idx[c] for c in present})
    if not samples:
        raise DfakdError(f"{name}: no images found under {split_dir}")
    if split_dir == train_dir:
        empty = sorted(set(classes) - {classes[label] for _, label in samples})
        if empty:
            raise DfakdError(
                f"{name}: class folder(s) {', '.join(str(train_dir / c) for c in empty)} hold no images "
                "(a class must have training images)"
            )
    ref_path, width, height = _reference_size(name, train_dir, classes)
    images = np.empty((len(samples), height, width, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(samples):
        img = _read_rgb(name, path)
        if img.shape[:2] != (height, width):
            raise DfakdError(
                f"{name}: image {path} is {img.shape[1]}x{img.shape[0]}, expected {width}x{height} like the "
                f"training split ({ref_path})"
            )
        images[i] = img
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor([label for _, label in samples], dtype=torch.int64)
    return ImageSplit(tensor, labels, classes)


def stratified_halves(labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into two halves with the same class proportions (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    first, second = [], []
    for cls in torch.unique(labels):
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        half = idx.numel() // 2
        first.append(idx[:half])
        second.append(idx[half:])
    return torch.sort(torch.cat(first)).values, torch.sort(torch.cat(second)).values
