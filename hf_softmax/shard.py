"""A rank's share of a sampled softmax: its rows, sampler, active set, margin logits, top-1.

Under DDP every rank sees the gathered batch (B samples) but owns only the balanced block of
classes [start, end) = ``shard_range(N, R, rank)``; a sample whose target class is elsewhere
has target -1 here. A rank's rows are never parameters, so DDP's all-reduce never sees them,
and the all-gather backward scales its feature gradient by R (``ddp_grad_scale``): the
backbone gets the gradient of the global-batch loss. On one process
(start, end) = (0, N), every target is local and these are the plain single-process steps.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch

from hf_softmax import collectives as coll
from hf_softmax.heads import MarginHead
from hf_softmax.row_store import RowStore, initial_rows
from hf_softmax.samplers.active_set import ActiveSet
from hf_softmax.samplers.base import Sampler

log = logging.getLogger(__name__)

_WARNED_GROW: weakref.WeakSet[Sampler] = weakref.WeakSet()  # samplers told M_r grows
SamplerFactory = Callable[..., Sampler]  # (num_classes=, metric=, seed=[, num=]) -> Sampler


def check_sampler(sampler: Any, num_classes: int, metric: str) -> Sampler:
    """-> ``sampler`` if it is a sampled (not ``full``) Sampler over ``num_classes`` with
    ``metric``; else ValueError naming what was expected."""
    if not isinstance(sampler, Sampler) or sampler.num_classes != num_classes:
        raise ValueError(f"classifier: the sampler must be a Sampler over {num_classes} "
                         f"classes, got {sampler!r}")  # fmt: skip
    if sampler.metric != metric:
        raise ValueError(f"classifier: sampler metric {sampler.metric!r} does not match the "
                         f"head's metric {metric!r}")  # fmt: skip
    if sampler.dense:
        raise ValueError("classifier: sampler 'full' trains a DenseClassifier, not this one")
    return sampler


def local_num(num: int, num_local: int, world: int, rank: int) -> int:
    """This rank's share M_r of M active classes, within 1..N_r."""
    return max(1, min(coll.split_count(num, world, rank), num_local))


def shard_sampler(
    factory: SamplerFactory, num_local: int, num: int | None, metric: str, seed: int,
    world: int, rank: int, state: dict[str, Any] | None = None,
) -> tuple[Sampler, int]:  # fmt: skip
    """-> (the sampler of this rank's N_r classes, the global M). ``factory`` is called with
    ``num_classes=N_r, metric=, seed=seed + 1009 * rank`` and ``num=M_r`` when ``num`` (M)
    is given; else the sampler's own ``num`` is taken as M and cut to M_r. ``state``: a
    sampler ``state_dict`` to continue (its ``num`` is not taken)."""
    kw: dict[str, Any] = dict(num_classes=num_local, metric=metric, seed=seed + 1009 * rank)
    if num is not None:
        kw["num"] = local_num(num, num_local, world, rank)
    sampler = check_sampler(factory(**kw), num_local, metric)
    if num is None:
        num = sampler.num
        sampler.num = local_num(num, num_local, world, rank)
    if state is not None:
        sampler.load_state_dict({**state, "num": sampler.num})
    return sampler, int(num)


def rank_store(
    num_classes: int, dim: int, world: int, rank: int, previous: RowStore | None,
    previous_world: int, previous_rank: int, initial: torch.Tensor | None, init_std: float,
    seed: int, **store_kw: Any,
) -> RowStore:  # fmt: skip
    """The RowStore of this rank's rows ``shard_range(N, world, rank)``: ``previous`` (a store
    made before the process group existed, ``previous_world`` 1; another world: RuntimeError)
    sliced, else ``initial`` (N, D)
    sliced (used in place on one process), else N(0, ``init_std``) rows by seeded blocks
    (``row_store.initial_rows``: the same rows for every world size). ``store_kw``: RowStore's
    ``mu``, ``weight_decay``, ``offload``."""
    if previous is not None and previous_world != 1:
        raise RuntimeError(
            f"classifier was built for rank {previous_rank} of {previous_world} but now runs "
            f"as rank {rank} of {world}; reload a consolidated checkpoint"
        )
    start, end = coll.shard_range(num_classes, world, rank)
    if end <= start:
        raise ValueError(f"classifier: N = {num_classes} classes cannot be split over "
                         f"{world} ranks (rank {rank} would own none)")  # fmt: skip
    if previous is not None:
        return previous.sliced(start, end)
    if initial is not None:
        return RowStore(initial[start:end] if world > 1 else initial, start, **store_kw)
    rows = initial_rows(start, end, num_classes, dim, init_std, seed)
    return RowStore(rows, start, **store_kw)


def select_in_shard(
    sampler: Sampler, features: torch.Tensor, labels: torch.Tensor, start: int, end: int
) -> ActiveSet:
    """Gathered features (B, D) (detached), global labels (B,) -> ActiveSet with ids LOCAL to
    [start, end), targets into them or -1 where the class lives on another rank.

    More positives in the shard than the sampler's M_r: the active set grows to hold them
    for that step (logged once per sampler).
    """
    labels = labels.detach().to("cpu", torch.int64).view(-1)
    local = (labels >= start) & (labels < end)
    num_pos, restore = int(torch.unique(labels[local]).numel()), None
    if num_pos > sampler.num:
        if sampler not in _WARNED_GROW:
            _WARNED_GROW.add(sampler)
            log.info("classes [%d, %d): %d positives exceed the shard's share M_r = %d; the "
                     "active set grows for such steps (raise sampler.num to avoid this)",
                     start, end, num_pos, sampler.num)  # fmt: skip
        restore, sampler.num = sampler.num, num_pos
    try:
        active = sampler.select(features, labels[local] - start)
    finally:
        if restore is not None:
            sampler.num = restore
    targets = torch.full_like(labels, -1)
    targets[local] = active.targets
    # the shard's logq correction estimates the shard's share of the normaliser; the
    # distributed softmax sums the shards, so the adjustments carry over unchanged
    return dataclasses.replace(active, targets=targets)


def margin_logits(
    head: MarginHead, feats: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """(B, D), (M_r, D), (B,) with -1 = not here -> (B, M_r), margin at local targets only.

    Rows whose target is elsewhere get column 0 as the head's stand-in target, whose plain
    logit is then written back. With every target local: ``head(feats, rows, targets)``.
    """
    if rows.shape[0] == 0:
        return feats.new_zeros((feats.shape[0], 0))
    logits = head(feats, rows, targets.clamp(min=0))
    other = torch.nonzero(targets < 0).view(-1)
    if other.numel() == 0 or getattr(head, "margin", 0.0) == 0.0:
        return logits
    plain0 = head.plain_logits(feats.index_select(0, other), rows[:1])  # (b, 1)
    col0 = logits[:, :1].index_copy(0, other, plain0.to(logits.dtype))
    return torch.cat([col0, logits[:, 1:]], dim=1)


@torch.no_grad()
def plain_hit(
    head: MarginHead,
    feats: torch.Tensor,
    rows: torch.Tensor,
    targets: torch.Tensor,
    group: Any = None,
    distributed: bool = False,
) -> torch.Tensor:
    """(B, D), (M_r, D), (B,) local targets or -1 -> (B,) bool: the target's plain logit (no
    margin) is the maximum over all ranks' active rows.

    One all-reduce (MAX) of [row max; target logit, -inf where the target is elsewhere] when
    ``distributed``: every target lives on exactly one rank.
    """
    stats = feats.new_full((2, feats.shape[0]), -float("inf"), dtype=torch.float32)
    if rows.shape[0]:
        plain = head.plain_logits(feats.detach(), rows.detach()).float()  # (B, M_r)
        stats[0] = plain.max(dim=1).values
        local = torch.nonzero(targets >= 0).view(-1)
        stats[1, local] = plain[local, targets[local]]
    if distributed:
        coll.all_reduce_max_(stats, group)
    return stats[1] >= stats[0]


@torch.no_grad()
def best_classes(
    store: RowStore, head: MarginHead, features: torch.Tensor, k: int | None, chunk_size: int,
    group: Any = None, world: int = 1, rank: int = 0,
) -> torch.Tensor:  # fmt: skip
    """features (B_r, D) -> (B_r,) argmax ids (``k`` None) or (B_r, k) top-k ids, best first,
    of the plain logits over all N classes. Under DDP (``world`` > 1, a collective) each rank
    scores the gathered batch against its block and the ranks' bests are merged (ties:
    lowest id)."""
    if world == 1:
        if k is None:
            return store.argmax(features, head, chunk_size)[1]
        return store.topk(features, head, k, chunk_size)[1]
    feats, sizes = coll.gather_rows_of_batch(features, group)
    if k is None:
        merged = coll.merge_argmax(*store.argmax(feats, head, chunk_size), group)
    else:  # (B, k_r) per rank, k_r <= k
        merged = coll.merge_topk(*store.topk(feats, head, k, chunk_size), k, group)
    return coll.my_rows(merged, sizes, rank)
