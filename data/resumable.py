"""Exact resume of the training order: ``ResumableSampler`` and ``ResumableDataLoader``.

Order and flips of an epoch are functions of (seed, epoch, rank) alone, and the loader's
``state_dict`` (saved by Lightning in every checkpoint, under
``loops.fit_loop.state_dict.combined_loader``) records how far the epoch got, so
``ckpt_path=...`` continues mid-epoch with the very batches an uninterrupted run would see, for
any ``num_workers``. The sampler is a ``DistributedSampler``: under DDP it shards by rank itself
(Lightning leaves it in place) and resumes each rank's shard at the same position; resuming
with another world size restarts that epoch's order (logged warning).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger(__name__)

__all__ = ["ResumableDataLoader", "ResumableSampler"]


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
    lookahead: yield each batch as ``(*batch, next_labels)``, the next batch's labels
    ``batch[1]`` as a numpy int64 array (empty after the last batch), kept out of the device
    transfer, so the model can select the next step ahead. The loader reads one batch ahead;
    resume is unaffected because the sampler counts the batches training consumed.
    """

    def __init__(self, *args: Any, lookahead: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lookahead = bool(lookahead)

    def __iter__(self) -> Iterator[Any]:
        it = super().__iter__()
        if not self.lookahead:
            return it
        return _with_next_labels(it)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def _with_next_labels(batches: Iterable[Any]) -> Iterator[tuple[Any, ...]]:
    """(images, labels, ...) batches -> (images, labels, ..., next batch's labels as numpy)."""
    it = iter(batches)
    current = next(it, None)
    while current is not None:
        following = next(it, None)
        labels = np.empty(0, np.int64) if following is None else following[1].numpy()
        yield (*current, labels)
        current = following
