"""Lightning DataModule over InsightFace/plain RecordIO: training images, held-out split, .bin sets.

``RecordDataModule(path=...)`` trains from ``<path>/train.rec`` (or a .rec file given directly);
``demo=True`` generates and caches the procedural demo set instead (``data.demo``).

Batches (C = ``channels``: 3 RGB, 1 grayscale for a ``model.in_channels=1`` backbone):
    train:   ``(images (B,C,H,W) float32 in [-1,1], randomly h-flipped unless flip=False;
             labels (B,) int64)``
    holdout: ``(images, labels)`` unflipped, held-out images of training classes (closed-set top-1)
    <bin>:   ``(images, index (B,) int64)`` unflipped; ``index`` points into the set's image list,
             pairs are (2i, 2i+1) and ``verification_sets[name].issame[i]`` says if they match.

The datasets and their collate live in ``data.datasets``; the training loader is a
``data.resumable.ResumableDataLoader`` (exact mid-epoch resume); ``.bin`` names resolve with
``data.verification.find_bin``. All are importable from here too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from data.datasets import BinImageDataset, RecordImageDataset, SkipCounter, collate_images
from data.layout import split_holdout
from data.resumable import ResumableDataLoader, ResumableSampler
from data.verification import find_bin

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
    """Turn bin names (``lfw`` -> ``<root>/lfw.bin``) or paths into existing files
    (``data.verification.find_bin``)."""
    return [find_bin(b, [root]) for b in bins]


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
        # the next batch's labels with each training batch (set by the module when its
        # classifier selects ahead, ``classifier.prefetch``; data.resumable)
        self.lookahead = False

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
            **({"lookahead": self.lookahead} if train else {}),
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
