"""Lightning DataModule over InsightFace/plain RecordIO: training images, held-out split, .bin sets.

``RecordDataModule(path=...)`` trains from ``<path>/train.rec`` (or a .rec file given directly);
``demo=True`` generates and caches the procedural demo set instead (``data.demo``).

Batches (C = ``channels``: 3 RGB, 1 grayscale for a ``model.in_channels=1`` backbone):
    train:   ``(images (B,C,H,W) float32 in [-1,1], randomly h-flipped unless flip=False;
             labels (B,) int64)``
    holdout: ``(images, labels)`` unflipped, held-out images of training classes (closed-set top-1)
    <bin>:   ``(images, index (B,) int64)`` unflipped; ``index`` points into the set's image list,
             pairs are (2i, 2i+1) and ``verification_sets[name].issame[i]`` says if they match.

Datasets keep the encoded bytes on disk (train) or in memory (.bin) and decode in the worker.
They hold a ``RecordReader``, which opens its file handle lazily per process: datasets pickle
(spawn) and fork safely.

Exact resume: the training loader is a ``ResumableDataLoader`` over a ``ResumableSampler``. Order
and flips of an epoch are functions of (seed, epoch, rank) alone, and the loader's ``state_dict``
(saved by Lightning in every checkpoint, under ``loops.fit_loop.state_dict.combined_loader``)
records how far the epoch got, so ``ckpt_path=...`` continues mid-epoch with the very batches an
uninterrupted run would see, for any ``num_workers``. The sampler is a ``DistributedSampler``:
under DDP it shards by rank itself (Lightning leaves it in place) and resumes each rank's shard at
the same position; resuming with another world size restarts that epoch's order (logged warning).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.context import get_spawning_popen
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from data.transforms import ImageDecodeError, decode_image, hflip

log = logging.getLogger(__name__)

__all__ = [
    "BinImageDataset",
    "RecordDataModule",
    "RecordImageDataset",
    "ResumableDataLoader",
    "ResumableSampler",
    "SkipCounter",
    "collate_images",
    "resolve_bins",
    "resolve_rec",
    "split_holdout",
]


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
        reader,
        keys: np.ndarray,
        labels: np.ndarray,
        image_size: tuple[int, int],
        flip: bool = False,
        skip_corrupt: bool = False,
        counter: SkipCounter | None = None,
        channels: int = 3,
    ):
        super().__init__(image_size, flip, skip_corrupt, counter or SkipCounter(), channels)
        from data.recordio import unpack

        self._unpack = unpack
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
        _, payload = self._unpack(self.reader.read_idx(key))
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


class ResumableSampler(DistributedSampler):
    """Epoch order and flips from (seed, epoch, rank); resumes mid-epoch from its state_dict.

    Yields ``(index, flip)`` (plain ``index`` when ``flip`` is False): this rank's share of the
    ``DistributedSampler`` permutation (seeded with ``seed + epoch``; ``num_replicas``/``rank``
    default to the process group's, or 1/0 without one) and a flip bit per position from
    ``default_rng([seed, epoch, rank])``.
    Nothing depends on global or worker RNG state: any ``num_workers`` gives the same batches.

    ``progress``: how many of this epoch's items training has consumed (the DataModule counts
    the trainer's processed batches; Lightning fetches ahead, so counting yielded items would
    overshoot). Without it, the items yielded so far are used (exact only without workers).
    """

    def __init__(
        self,
        dataset: Dataset,
        seed: int = 0,
        shuffle: bool = True,
        flip: bool = True,
        progress: Callable[[], int | None] | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=int(seed),
        )
        self.flip = flip
        self.progress = progress
        self._yielded = 0
        self._resume: tuple[int, int] | None = None  # (epoch, items to skip in it)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self._resume is not None and self._resume[0] != epoch:
            self._resume = None

    def __iter__(self) -> Iterator[tuple[int, bool] | int]:
        if self._resume is not None and self._resume[1] >= self.num_samples:
            # resumed after the last item of an epoch: the iterator may be created before
            # Lightning sets the next epoch (worker prefetch), so that epoch starts here
            self.epoch, self._resume = self._resume[0] + 1, None
        indices = list(super().__iter__())  # (num_samples,) this rank's share of the epoch
        flips = np.random.default_rng([self.seed, self.epoch, self.rank]).random(len(indices))
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = min(self._resume[1], len(indices))
        self._yielded = start
        for pos in range(start, len(indices)):
            self._yielded = pos + 1
            yield (indices[pos], bool(flips[pos] < 0.5)) if self.flip else indices[pos]
        self._resume = None  # the resumed epoch is done; later passes start at 0

    def state_dict(self) -> dict:
        consumed = self.progress() if self.progress is not None else None
        return {
            "epoch": int(self.epoch),
            "seed": int(self.seed),
            "consumed": int(self._yielded if consumed is None else consumed),
            "num_samples": int(self.num_samples),
            "num_replicas": int(self.num_replicas),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue epoch ``state["epoch"]`` after its first ``state["consumed"]`` items."""
        mismatch = {
            k: (state.get(k), v)
            for k, v in (
                ("seed", self.seed),
                ("num_samples", self.num_samples),
                ("num_replicas", self.num_replicas),
            )
            if state.get(k) != v
        }
        if mismatch:
            log.warning(
                "training data differs from the checkpoint's (checkpoint, now): %s; epoch %s "
                "restarts from its first batch", mismatch, state.get("epoch"),
            )  # fmt: skip
            return
        self.epoch = int(state["epoch"])
        self._resume = (self.epoch, int(state["consumed"]))


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning checkpoints (``state_dict``) and restores mid-epoch.

    Its sampler must be a ``ResumableSampler``; the state is the sampler's.
    """

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def collate_images(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(uint8 image, int)`` items, dropping None (skipped), and normalise once per batch.

    Returns ``(images (B,C,H,W) float32, targets (B,) int64)``; B may be 0 if all were skipped.
    """
    items = [b for b in batch if b is not None]
    if not items:
        return torch.empty(0, 3, 0, 0), torch.empty(0, dtype=torch.int64)
    # numpy, not torch: with num_workers=0 this runs in the training process, where torch's
    # intra-op thread pool can stall badly on a busy machine (measured 2 s vs 40 ms per batch
    # of 128 at 112x112 with 2 threads on 2 loaded cores). Same values as ``normalize``.
    images = np.stack([img.numpy() for img, _ in items]).astype(np.float32)
    images -= np.float32(127.5)
    images /= np.float32(127.5)
    targets = torch.tensor([t for _, t in items], dtype=torch.int64)
    return torch.from_numpy(images), targets


def split_holdout(
    labels: np.ndarray, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split image positions into (train, holdout) keeping >= 1 training image per class.

    Args:
        labels: ``(n,)`` int64 class of each image.
        fraction: wanted share of held-out images, in [0, 1).
    Returns:
        ``(train_positions, holdout_positions)``, each sorted int64.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    n = len(labels)
    if fraction == 0.0 or n == 0:
        return np.arange(n, dtype=np.int64), np.empty(0, np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    held = order[: int(round(fraction * n))]
    # a class whose images were all held out gets its first held-out image back
    _, held_counts = np.unique(labels[held], return_counts=True)
    classes, total = np.unique(labels, return_counts=True)
    all_held = np.zeros(labels.max() + 1 if n else 0, bool)
    held_classes = np.unique(labels[held])
    all_held[held_classes] = held_counts == total[np.searchsorted(classes, held_classes)]
    if all_held.any():
        back = np.zeros(len(held), bool)
        seen: set[int] = set()
        for j, c in enumerate(labels[held].tolist()):
            if all_held[c] and c not in seen:
                seen.add(c)
                back[j] = True
        held = held[~back]
    mask = np.zeros(n, bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def resolve_rec(path: str | Path) -> Path:
    """The .rec of a dataset given as a directory (``<dir>/train.rec``) or a .rec file."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "train.rec"
    if not p.is_file():
        raise FileNotFoundError(
            f"no RecordIO file at {p} (data.path should be a directory with train.rec/train.idx"
            "/property or a .rec file)"
        )
    return p


def resolve_bins(bins: Sequence[str], root: Path) -> list[Path]:
    """Turn bin names (``lfw`` -> ``<root>/lfw.bin``) or paths into existing files."""
    out = []
    for b in bins:
        b = str(b)
        candidates = [Path(b).expanduser()]
        if "/" not in b and not b.endswith(".bin"):
            candidates = [root / f"{b}.bin", *candidates]
        elif not candidates[0].is_absolute():
            candidates.append(root / b)
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            looked = ", ".join(str(c) for c in candidates)
            raise FileNotFoundError(f"verification set {b!r} not found; looked for: {looked}")
        out.append(found)
    return out


class RecordDataModule(pl.LightningDataModule):
    """Training/validation data from a RecordIO dataset (or the generated demo set).

    Args:
        path: dataset directory (with train.rec, train.idx, property, *.bin) or a .rec file.
            Ignored when ``demo`` is true.
        demo: use ``data.demo.ensure_demo(**demo_kwargs)`` as the dataset directory.
        batch_size: training batch size (last incomplete batch dropped when there is > 1 batch).
        num_workers: DataLoader worker processes (0 = decode in the main process).
        image_size: output H = W; images stored at another size are resized.
        val_fraction: share of training images held out for closed-set top-1 (0 = none).
        bins: verification sets, names (``lfw`` -> ``<path>/lfw.bin``) or paths.
        val_batch_size: batch size of the validation loaders.
        skip_corrupt: False raises ImageDecodeError on an undecodable image; True logs, counts
            (``skipped_images``) and drops it from its batch.
        pin_memory, persistent_workers: passed to the DataLoaders.
        seed: seed of the held-out split and of the training order and flips (``ResumableSampler``).
        flip: random horizontal flips of training images; False for data whose mirror image
            is another class (text glyphs).
        channels: 3 decodes every image as RGB, 1 as grayscale (PIL ``L``); must match the
            backbone's ``model.in_channels`` (the configs interpolate it from there).
        demo_kwargs: ``data.demo.DemoParams`` fields (plus ``root``) for the demo set.
    """

    def __init__(
        self,
        path: str | None = None,
        demo: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
        image_size: int | Sequence[int] = 112,
        val_fraction: float = 0.0,
        bins: Sequence[str] = (),
        val_batch_size: int = 256,
        skip_corrupt: bool = False,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int = 0,
        flip: bool = True,
        channels: int = 3,
        demo_kwargs: dict | None = None,
    ):
        super().__init__()
        if not demo and path is None:
            raise ValueError("RecordDataModule needs data.path (a RecordIO dataset) or demo=true")
        if int(channels) not in (1, 3):
            raise ValueError(f"data.channels = {channels}, expected 1 (grayscale) or 3 (RGB)")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.path = path
        self.demo = demo
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.image_size: tuple[int, int] = (int(size[0]), int(size[1]))
        self.val_fraction = float(val_fraction)
        self.bins = list(bins or [])
        self.val_batch_size = int(val_batch_size)
        self.skip_corrupt = skip_corrupt
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.seed = seed
        self.flip = bool(flip)
        self.channels = int(channels)
        self.demo_kwargs = dict(demo_kwargs or {})
        self._rec: Path | None = None
        self._num_classes: int | None = None
        self._counter = SkipCounter()
        self.train_dataset: RecordImageDataset | None = None
        self.holdout_dataset: RecordImageDataset | None = None
        self.bin_datasets: dict[str, BinImageDataset] = {}
        self.verification_sets: dict = {}
        self.val_names: list[str] = []

    # ------------------------------------------------------------------ locations
    def _demo_root(self) -> Path:
        from data.demo import ensure_demo

        kwargs = dict(self.demo_kwargs)
        root = kwargs.pop("root", None)
        return ensure_demo(root, **kwargs)

    @property
    def rec_path(self) -> Path:
        """The training .rec (generating the demo data on first use)."""
        if self._rec is None:
            self._rec = self._demo_root() / "train.rec" if self.demo else resolve_rec(self.path)
        return self._rec

    def prepare_data(self) -> None:
        """Generate the demo data if needed (atomic, idempotent) and read the class count."""
        _ = self.num_classes

    @property
    def num_classes(self) -> int:
        """Number of classes, from ``property`` when present, else from the labels."""
        if self._num_classes is None:
            from data.layout import read_property

            prop = self.rec_path.parent / "property"
            if prop.is_file():
                self._num_classes = read_property(prop)[0]
            else:  # no property file: the labels decide (reads every image header once)
                from data.layout import read_layout
                from data.recordio import RecordReader

                self._num_classes = read_layout(RecordReader(self.rec_path)).num_classes
        return self._num_classes

    @property
    def skipped_images(self) -> int:
        """Undecodable images skipped so far (all loaders and workers; skip_corrupt=True)."""
        return self._counter.value

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        from data.layout import read_layout
        from data.recordio import RecordReader
        from data.verification import load_bin

        reader = RecordReader(self.rec_path)
        layout = read_layout(reader)
        self._num_classes = layout.num_classes
        train_pos, held_pos = split_holdout(layout.labels, self.val_fraction, self.seed)
        if len(train_pos) == 0:
            raise ValueError(f"{self.rec_path}: empty training set after the held-out split")
        self.train_dataset = RecordImageDataset(
            reader,
            layout.image_keys[train_pos],
            layout.labels[train_pos],
            self.image_size,
            flip=self.flip,
            skip_corrupt=self.skip_corrupt,
            counter=self._counter,
            channels=self.channels,
        )
        self.val_names = []
        if len(held_pos):
            self.holdout_dataset = RecordImageDataset(
                reader,
                layout.image_keys[held_pos],
                layout.labels[held_pos],
                self.image_size,
                skip_corrupt=self.skip_corrupt,
                counter=self._counter,
                channels=self.channels,
            )
            self.val_names.append("holdout")
        for path in resolve_bins(self.bins, self.rec_path.parent):
            vs = load_bin(path)
            name = vs.name
            if name in self.verification_sets or name == "holdout":
                raise ValueError(f"two validation sets named {name!r} (from {path})")
            self.verification_sets[name] = vs
            self.bin_datasets[name] = BinImageDataset(
                vs.images, name, self.image_size, self.skip_corrupt, self._counter, self.channels
            )
            self.val_names.append(name)
        log.info(
            "data: %s, %d train images, %d classes, %d held out, validation %s",
            self.rec_path, len(train_pos), layout.num_classes, len(held_pos), self.val_names,
        )  # fmt: skip

    # ------------------------------------------------------------------ loaders
    def _consumed(self) -> int | None:
        """Training items consumed in the current epoch (per rank), from the trainer's progress."""
        trainer = getattr(self, "trainer", None)
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        if loop is None:
            return None
        return int(loop.batch_progress.current.processed) * self.batch_size

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        workers = self.num_workers
        sampler = (
            ResumableSampler(dataset, seed=self.seed, flip=dataset.flip, progress=self._consumed)
            if train
            else None
        )
        return (ResumableDataLoader if train else DataLoader)(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=train and len(sampler) > batch_size,
            num_workers=workers,
            collate_fn=collate_images,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.train_dataset, self.batch_size, train=True)

    def val_dataloader(self) -> list[DataLoader]:
        if self.train_dataset is None:
            self.setup("validate")
        loaders = []
        for name in self.val_names:
            ds = self.holdout_dataset if name == "holdout" else self.bin_datasets[name]
            loaders.append(self._loader(ds, self.val_batch_size, train=False))
        return loaders
