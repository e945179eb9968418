"""Datasets of encoded images (a .rec by key, a .bin in memory) and their batch collate.

Items are ``((C,H,W) uint8, int)`` or None for an undecodable image skipped with
``skip_corrupt``; ``collate_images`` drops the Nones and normalises once per batch (C = 3 RGB,
1 grayscale). Datasets keep the encoded bytes on disk (train) or in memory (.bin) and decode
in the worker. They hold a ``RecordReader``, which opens its file handle lazily per process:
datasets pickle (spawn) and fork safely.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Sequence
from multiprocessing.context import get_spawning_popen
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from data.recordio import RecordReader, unpack
from data.transforms import ImageDecodeError, decode_image, hflip, normalize

log = logging.getLogger(__name__)

__all__ = ["BinImageDataset", "RecordImageDataset", "SkipCounter", "collate_images"]


class SkipCounter:
    """Count of skipped (undecodable) images shared by the main process and its workers.

    Backed by a ``multiprocessing.Value`` inherited by DataLoader workers (fork or spawn);
    pickled any other way (e.g. ``pickle.dumps(dataset)``) the copy gets its own local count.
    """

    def __init__(self) -> None:
        self._shared = mp.Value("q", 0)
        self._local = 0

    def add(self, n: int = 1) -> None:
        if self._shared is not None:
            with self._shared.get_lock():
                self._shared.value += n
        else:
            self._local += n

    @property
    def value(self) -> int:
        return int(self._shared.value) if self._shared is not None else self._local

    def __getstate__(self) -> dict:
        if get_spawning_popen() is not None:  # being sent to a starting worker process
            return {"_shared": self._shared, "_local": 0}
        return {"_shared": None, "_local": self.value}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


class _ImageDataset(Dataset):
    """Shared decode path: bytes -> (C,H,W) uint8 at ``image_size``, optional random flip."""

    def __init__(
        self,
        image_size: tuple[int, int],
        flip: bool,
        skip_corrupt: bool,
        counter: SkipCounter,
        channels: int = 3,
    ):
        self.image_size = tuple(image_size)
        self.flip = flip
        self.channels = int(channels)
        self.skip_corrupt = skip_corrupt
        self.skipped = counter

    def _image(self, data: bytes, source: str, flip: bool | None = None) -> torch.Tensor | None:
        """``flip``: None = random (if ``self.flip``), else as given (``ResumableSampler``)."""
        try:
            img = decode_image(data, source, size=self.image_size, channels=self.channels)
        except ImageDecodeError as exc:
            if not self.skip_corrupt:
                raise
            self.skipped.add()
            log.warning("skipping undecodable image (skip_corrupt=True): %s", exc)
            return None
        if flip is None:
            # torch's RNG: seeded per worker by the DataLoader (and seed_everything(workers=True))
            flip = self.flip and bool(torch.rand(()) < 0.5)
        if flip:
            img = hflip(img)
        return img


class RecordImageDataset(_ImageDataset):
    """Images of a .rec by key. Item ``i``: ``((C,H,W) uint8, label int)`` or None if skipped.

    Also indexable by ``(i, flip)`` (what ``ResumableSampler`` yields): the flip is then given.
    """

    def __init__(
        self,
        reader: RecordReader,
        keys: np.ndarray,
        labels: np.ndarray,
        image_size: tuple[int, int],
        flip: bool = False,
        skip_corrupt: bool = False,
        counter: SkipCounter | None = None,
        channels: int = 3,
    ):
        super().__init__(image_size, flip, skip_corrupt, counter or SkipCounter(), channels)
        self.reader = reader  # data.recordio.RecordReader: lazy per-process handle
        self.keys = np.asarray(keys, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.keys) != len(self.labels):
            raise ValueError(f"{len(self.keys)} keys but {len(self.labels)} labels")
        self._name = Path(reader.rec_path).name

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, item: int | tuple[int, bool]):
        i, flip = item if isinstance(item, tuple) else (item, None)
        key = int(self.keys[i])
        _, payload = unpack(self.reader.read_idx(key))
        img = self._image(payload, f"{self.reader.rec_path} key {key}", flip)
        return None if img is None else (img, int(self.labels[i]))


class BinImageDataset(_ImageDataset):
    """Images of a verification set (in memory). Item ``i``: ``((C,H,W) uint8, i)`` or None."""

    def __init__(
        self,
        images: Sequence[bytes],
        name: str,
        image_size: tuple[int, int],
        skip_corrupt: bool = False,
        counter: SkipCounter | None = None,
        channels: int = 3,
    ):
        super().__init__(image_size, False, skip_corrupt, counter or SkipCounter(), channels)
        self.images = images
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = self._image(self.images[i], f"{self.name} image {i}")
        return None if img is None else (img, i)


def collate_images(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(uint8 image, int)`` items, dropping None (skipped), and normalise once per batch.

    Returns ``(images (B,C,H,W) float32, targets (B,) int64)``; B may be 0 if all were skipped.
    """
    items = [b for b in batch if b is not None]
    if not items:
        return torch.empty(0, 3, 0, 0), torch.empty(0, dtype=torch.int64)
    images = torch.from_numpy(np.stack([img.numpy() for img, _ in items]))  # (B,C,H,W) uint8
    targets = torch.tensor([t for _, t in items], dtype=torch.int64)
    return normalize(images), targets
