"""Training batches: the DataLoader, its worker settings, and augmentation that is seeded per batch.

`training.train` builds its loaders with `make_loader`; `python -m scripts.bench_loading` measures
them with `throughput` (through training/bench.py):

    .venv/bin/python -m scripts.bench_loading          # images/s for 0, 1 and 2 workers -> docs/training.md

Each sampler item is a whole batch: `(seed, indices)`, drawn in the main process from one generator
seeded by the run's seed. A worker (or the main process, with 0 workers) gathers those images and
augments them with a generator seeded by that batch's seed, so the batches, and their augmentation,
are the same whatever `data.num_workers` is, and gathering a batch is one indexing operation instead
of a Python call per image.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from training.config import DataConfig


def augment(images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Train-only augmentation on a uint8 batch (N, H, W): random h-flip and shift.

    Works on the raw pixels before `normalize`, so the shared preprocessing stays
    the only place that maps pixels to model input.
    """
    n, h, w = images.shape
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip[:, None, None], images.flip(-1), images)
    if max_shift <= 0:
        return images
    padded = F.pad(images, (max_shift,) * 4)  # zero = background colour
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (N, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (N, 1, W)
    return padded[torch.arange(n)[:, None, None], rows, cols]


class SeededBatches(Sampler[tuple[int, torch.Tensor]]):
    """Yields `(batch seed, indices)` for every batch of an epoch; each epoch continues one stream."""

    def __init__(self, size: int, batch_size: int, seed: int, shuffle: bool) -> None:
        self.size, self.batch_size, self.shuffle = size, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-self.size // self.batch_size)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        n = self.size
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        seeds = torch.randint(0, 2**62, (len(self),), generator=self.generator).tolist()
        for seed, start in zip(seeds, range(0, self.size, self.batch_size), strict=True):
            yield seed, order[start : start + self.batch_size]


class Batches(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Items are whole batches: `(seed, indices)` -> (uint8 images, labels), augmented if asked."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool, max_shift: int) -> None:
        self.images, self.labels = images, labels
        self.augment, self.max_shift = augment, max_shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        seed, indices = key
        images = self.images[indices]
        if self.augment:
            images = augment(images, self.max_shift, torch.Generator().manual_seed(seed))
        return images, self.labels[indices]


def make_loader(
    images: torch.Tensor, labels: torch.Tensor, cfg: DataConfig, seed: int, train: bool
) -> DataLoader:
    """The loader for one split: shuffled and augmented (if cfg.augment) for training, in order otherwise."""
    workers = cfg.num_workers
    return DataLoader(
        Batches(images, labels, augment=train and cfg.augment, max_shift=cfg.max_shift),
        sampler=SeededBatches(len(labels), cfg.batch_size if train else cfg.eval_batch_size, seed, train),
        batch_size=None,  # the sampler already yields whole batches
        num_workers=workers,
        # Both only mean something with worker processes; DataLoader refuses them without.
        persistent_workers=cfg.persistent_workers and workers > 0,
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
    )


def throughput(images: torch.Tensor, labels: torch.Tensor, cfg: DataConfig, epochs: int = 2) -> dict:
    """Images/s of iterating the training loader alone (no model), first epoch and the rest separately.

    The first epoch pays for starting the workers; later epochs show the steady state (with
    persistent workers they are reused, without they start again each epoch).
    """
    loader = make_loader(images, labels, cfg, seed=0, train=True)
    seconds = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        count = sum(len(batch_labels) for _, batch_labels in loader)
        seconds.append(time.perf_counter() - t0)
    later = seconds[1:] or seconds
    return {
        "num_workers": cfg.num_workers,
        "augment": cfg.augment,
        "images": count,
        "first_epoch_images_per_s": round(count / seconds[0]),
        "steady_images_per_s": round(count * len(later) / sum(later)),
    }
