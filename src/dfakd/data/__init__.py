"""Datasets in their real on-disk formats, and batched in-memory streams over them."""

from dfakd.data.datasets import (
    DATASETS,
    ImageSplit,
    dataset_info,
    load_split,
    normalization,
    num_classes,
    stratified_halves,
    train_augment,
)
from dfakd.data.stream import BatchStream

__all__ = [
    "DATASETS",
    "BatchStream",
    "ImageSplit",
    "dataset_info",
    "load_split",
    "normalization",
    "num_classes",
    "stratified_halves",
    "train_augment",
]
