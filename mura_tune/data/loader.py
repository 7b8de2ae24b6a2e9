"""Batches from the decoded cache: indices in, uint8 tensors out, no per-image Python work.

A :class:`CachedBatches` is a torch ``Dataset`` whose items are whole batches. Worker processes
(``num_workers > 0``) open the memory-mapped array themselves, so the cache is shared through
the page cache and never copied into each worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mura_tune.data.cache import ImageCache


@dataclass
class SplitData:
    """One split's images: their rows in the cache, labels, per-image loss weights and table."""

    rows: np.ndarray  # int64 rows into the cache array
    labels: torch.Tensor  # float32 (N,)
    weights: torch.Tensor  # float32 (N,) loss weight per image
    table: pd.DataFrame  # image_path, study_id, body_part, label, split (aligned with rows)

    def __len__(self) -> int:
        return len(self.rows)


class CachedBatches(torch.utils.data.Dataset):
    """Item ``b`` is batch ``b`` of a fixed order: ``(uint8 images (B,S,S), labels, weights, positions)``."""

    def __init__(
        self,
        array_path: Path,
        split: SplitData,
        order: np.ndarray,
        batch_size: int,
        images: np.ndarray | None = None,
    ):
        self.array_path = Path(array_path)
        self.split = split
        self.order = order
        self.batch_size = batch_size
        self._images = images

    def __len__(self) -> int:
        return (len(self.order) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, b: int):
        if self._images is None:  # opened lazily, once per worker process
            self._images = np.load(self.array_path, mmap_mode="r")
        pos = self.order[b * self.batch_size : (b + 1) * self.batch_size]
        rows = self.split.rows[pos]
        sort = np.argsort(rows, kind="stable")  # read the memmap in file order
        pos, rows = pos[sort], rows[sort]
        images = torch.from_numpy(np.ascontiguousarray(self._images[rows]))
        pos_t = torch.from_numpy(pos)
        return images, self.split.labels[pos_t], self.split.weights[pos_t], pos_t


def batch_loader(
    cache: ImageCache,
    split: SplitData,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
):
    """A DataLoader over whole batches of ``split`` (a new seeded order per call when shuffling).

    A shuffled (training) order never ends in a batch of one image, which BatchNorm cannot train
    on: that image is left out of this pass only (each epoch's order leaves out another one).
    """
    order = (
        np.random.default_rng(seed).permutation(len(split)) if shuffle else np.arange(len(split))
    )
    if shuffle and len(order) > 1 and len(order) % batch_size == 1:
        order = order[:-1]
    dataset = CachedBatches(
        cache.path / "images.npy",
        split,
        order,
        batch_size,
        images=cache.images if num_workers == 0 else None,
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
