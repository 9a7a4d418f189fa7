"""Torch datasets over a prepared cache.

Samples stay uint8 until they reach the training device: the loader only slices the
memory map; :func:`lungopacity.data.preprocess.network_input` turns the batch into the
network's input there and augmentation runs on it (see :mod:`lungopacity.data.transforms`),
so the loader is never the bottleneck.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lungopacity.data.cache import PreparedCache


class CacheDataset(Dataset):
    """Patients of a prepared cache as dict samples.

    Each sample: ``image`` uint8 ``(1, S, S)``, ``label`` (class 0/1/2), ``target``
    (0/1), ``boxes`` float32 ``(N, 4)`` xyxy in prepared pixels, ``position`` (row of
    the cache table).
    """

    def __init__(self, cache: PreparedCache, positions: Sequence[int] | np.ndarray) -> None:
        self.cache = cache
        self.positions = np.asarray(positions, dtype=np.int64)
        self.rows = cache.table["row"].to_numpy()[self.positions]
        self.labels = cache.table["class"].to_numpy()[self.positions].astype(np.int64)
        self.targets = cache.table["Target"].to_numpy()[self.positions].astype(np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    def _sample(self, i: int, image: np.ndarray) -> dict[str, Any]:
        position = int(self.positions[i])
        # A copy: the cache's memmap is read-only, and a tensor sharing it would let an in-place
        # transform write into (or fault on) the prepared images.
        return {
            "image": torch.from_numpy(np.array(image, copy=True))[None],
            "label": int(self.labels[i]),
            "target": int(self.targets[i]),
            "boxes": torch.from_numpy(self.cache.boxes_prepared(position).astype(np.float32)),
            "position": position,
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._sample(i, self.cache.images[self.rows[i]])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        # One fancy-indexed read of the memory map per batch (sorted for locality).
        indices = list(indices)
        rows = self.rows[indices]
        order = np.argsort(rows)
        block = np.empty((len(indices),) + self.cache.images.shape[1:], dtype=np.uint8)
        block[order] = self.cache.images[rows[order]]
        return [self._sample(i, block[k]) for k, i in enumerate(indices)]


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images and labels; keep boxes as a list (their counts differ)."""
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "target": torch.tensor([s["target"] for s in samples], dtype=torch.int64),
        "boxes": [s["boxes"] for s in samples],
        "position": torch.tensor([s["position"] for s in samples], dtype=torch.int64),
    }
