"""Batches from an in-memory split, with augmentation and normalization done on whole batches.

The uint8 images can live on the training device (the device-resident pipeline); crops, flips and
normalization then run there in batch, with no DataLoader workers. Shuffling and augmentation draw from
a generator seeded by ``(seed, epoch, stream)``, so a resumed epoch sees exactly the batches it would have
seen. The generator lives on the stream's device: the permutation, crop offsets and flips are drawn where
the images are, with no host-device copy and no wait for the GPU in a training step (on the CPU it is the
CPU generator of earlier versions: the same numbers).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from dfakd.data.datasets import ImageSplit

AUGMENTATIONS = ("crop_flip", "crop", "resized_crop_flip", "none")


def epoch_generator(
    seed: int, epoch: int, stream: int = 0, device: torch.device | str = "cpu"
) -> torch.Generator:
    """The generator of one epoch of one stream, on ``device`` (where the stream's images live)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch * 7_919 + stream)


def crop_flip(
    images: torch.Tensor, gen: torch.Generator, pad: int = 4, pad_mode: str = "constant", flip: bool = True
) -> torch.Tensor:
    """Random ``pad``-pixel-padded crop back to the input size, and (``flip``) a random horizontal flip,
    drawn on ``gen``, which lives on the images' device. Without ``flip`` the same random numbers are
    drawn, and the mirror is not applied."""
    n, _, h, w = images.shape
    dev = images.device
    mode = "constant" if pad_mode == "constant" else "reflect"
    padded = F.pad(images, (pad, pad, pad, pad), mode=mode)
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=dev)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=dev)
    mirror = torch.rand(n, generator=gen, device=dev) < (0.5 if flip else 0.0)
    rows = oy[:, None] + torch.arange(h, device=dev)
    cols = torch.arange(w, device=dev).expand(n, w)
    cols = torch.where(mirror[:, None], cols.flip(1), cols) + ox[:, None]
    batch = torch.arange(n, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def resized_crop_flip(
    images: torch.Tensor,
    gen: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """A batched approximation of torchvision's RandomResizedCrop (scale, ratio) plus a horizontal flip.

    Differences from torchvision, for speed: one draw per image with the crop clamped to the image
    (instead of up to 10 retries and a centre-crop fallback), and ``roi_align`` resampling (bilinear, 2x2
    samples averaged per output pixel) instead of a single bilinear sample. Drawn on ``gen``, which lives on
    the images' device."""
    from torchvision.ops import roi_align

    n, _, h, w = images.shape
    dev = images.device
    area = h * w * torch.empty(n, device=dev).uniform_(*scale, generator=gen)
    # the bounds as float32 logs, computed on the host (no device tensor is read back)
    low, high = (float(torch.log(torch.tensor(r))) for r in ratio)
    aspect = torch.exp(torch.empty(n, device=dev).uniform_(low, high, generator=gen))
    cw = torch.sqrt(area * aspect).round().clamp(1, w)
    ch = torch.sqrt(area / aspect).round().clamp(1, h)
    x0 = (torch.rand(n, generator=gen, device=dev) * (w - cw + 1)).floor()
    y0 = (torch.rand(n, generator=gen, device=dev) * (h - ch + 1)).floor()
    boxes = torch.stack([torch.arange(n, dtype=torch.float32, device=dev), x0, y0, x0 + cw, y0 + ch], 1)
    out = roi_align(images.float(), boxes, output_size=(h, w), sampling_ratio=2, aligned=True)
    flip = torch.rand(n, generator=gen, device=dev) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out.round().clamp(0, 255).to(torch.uint8)


class BatchStream:
    """Iterates ``(x, y)`` batches of one split: float normalized images on ``device``, int64 labels."""

    def __init__(
        self,
        split: ImageSplit,
        batch_size: int,
        device: torch.device,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        train: bool,
        augment: str = "none",
        pad_mode: str = "constant",
        seed: int = 0,
        stream_id: int = 0,
        channels_last: bool = False,
    ) -> None:
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}")
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size = batch_size
        self.device = device
        self.train = train
        self.augment = augment if train else "none"
        self.pad_mode = pad_mode
        self.seed = seed
        self.stream_id = stream_id
        self.channels_last = channels_last
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels)
        # training drops the last incomplete batch (BatchNorm on a batch of one fails)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = epoch_generator(self.seed, self.epoch, self.stream_id, self.images.device)
        n = len(self.labels)
        order = torch.randperm(n, generator=gen, device=self.images.device) if self.train else None
        for b in range(len(self)):
            index = slice(b * self.batch_size, min(n, (b + 1) * self.batch_size))
            idx = order[index] if order is not None else None
            images = self.images[idx] if idx is not None else self.images[index]
            labels = self.labels[idx] if idx is not None else self.labels[index]
            yield self.prepare(images, gen), labels

    def prepare(self, images: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        if self.augment == "crop_flip":
            images = crop_flip(images, gen, pad_mode=self.pad_mode)
        elif self.augment == "crop":  # translation only: a mirrored digit is another glyph
            images = crop_flip(images, gen, pad_mode=self.pad_mode, flip=False)
        elif self.augment == "resized_crop_flip":
            images = resized_crop_flip(images, gen)
        x = (images.float() - self.mean) / self.std
        # crop_flip gathers in NHWC: without this, channels_last false would still give channels-last batches
        return x.contiguous(
            memory_format=torch.channels_last if self.channels_last else torch.contiguous_format
        )
