"""SampledClassifier: W outside autograd in a RowStore, a softmax over M active rows per step.

One step, on one process or on every rank of a process group in lockstep::

    out = classifier(features, labels)   features (B_r, D), labels (B_r,) this rank's samples
    out.loss.backward()                  grads of the features and of the leaf rows W[A]
    classifier.step(out, lr)             lazy SGD momentum + wd on the rows A (RowStore.step_)

With ``next_labels`` (the next batch's labels) and a label-mode sampler, ``forward`` also
selects the next step's active set and stages its rows (``prefetch``;
``hf_softmax.select_ahead``, ``hf_softmax.row_prefetch``).

``forward``: the batch is all-gathered (not on one process); this rank's sampler picks M_r
(its share of M) of the classes it owns (all N on one process); logits (B, M_r) =
head(F, W[A_r]); the loss is ``F.cross_entropy`` on one process, else the distributed softmax
cross-entropy over the union of the ranks' active sets. The returned ``ClassifierOutput``
holds what the update needs (the leaf rows, their local ids).

Under DDP (``shard=True`` and an initialised process group of size R > 1) each rank owns
the balanced block of classes ``shard_range(N, R, rank)``; its rows are never parameters, so
DDP's all-reduce never sees them, and the all-gather backward scales this rank's feature
gradient by R (``ddp_grad_scale``) so the backbone gets the gradient of the global-batch
loss. The rows and the shard's sampler are made on first use (after Lightning has set up the
process group); a store made before that (world size 1) is sliced to the rank's block.

Checkpoints are consolidated: ``state_dict()`` (a collective under DDP: call it on every
rank) gathers the full (N, D) ``weight``, ``momentum`` and ``touched`` to rank 0 (other ranks
write (0, D)); loading takes this rank's block from the full tensors, so a checkpoint resumes
with any world size.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hf_softmax import collectives as coll
from hf_softmax.heads import MarginHead
from hf_softmax.output import ClassifierOutput
from hf_softmax.row_store import RowStore, initial_rows
from hf_softmax.samplers.base import Sampler
from hf_softmax.select_ahead import SelectAhead, prefetch_setting
from hf_softmax.shard import (
    SamplerFactory,
    check_sampler,
    load_sampler_tensors,
    local_num,
    margin_logits,
    plain_hit,
    sampler_tensors,
    select_in_shard,
    shard_sampler,
)

log = logging.getLogger(__name__)

_KEYS = ("weight", "momentum", "num_updates", "touched", "sampler_rng", "sampler_counters")


class SampledClassifier(nn.Module):
    """N-way classifier whose rows live in a RowStore and are updated sparsely.

    sampler: a built ``Sampler`` over all N classes (then never sharded), or a factory called
    with ``num_classes=N_r, metric=, seed=`` (and ``num=M_r`` when ``num`` is known) that
    builds the sampler of the rank's classes; seeds are ``seed + 1009 * rank``.
    num: M, active classes per step summed over ranks (default: the sampler's).
    weight: initial W (N, D) float32, used in place (device and pinning kept; sliced under
    DDP); default N(0, ``init_std``) by seeded blocks (``row_store.initial_rows``).
    prefetch: "auto" | True | False: select the next step ahead and stage its rows
    (``hf_softmax.select_ahead``; auto: CUDA with offloaded rows).
    shard: with a factory, split the rows over the ranks of ``group`` when it is initialised
    with size > 1 (false: every rank keeps all N rows and issues no collective).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        head: MarginHead,
        sampler: Sampler | SamplerFactory,
        num: int | None = None,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        offload: bool = False,
        init_std: float = 0.01,
        seed: int = 0,
        weight: torch.Tensor | None = None,
        shard: bool = True,
        group: Any = None,
        ddp_grad_scale: bool = True,
        prefetch: str | bool = "auto",
    ) -> None:
        super().__init__()
        self.prefetch = prefetch_setting(prefetch)
        self.ahead = SelectAhead()
        if not isinstance(head, MarginHead):
            raise TypeError(f"classifier: head must be a MarginHead, got {type(head).__name__}")
        self.num_classes, self.embedding_dim = int(num_classes), int(embedding_dim)
        self.head = head
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.offload, self.init_std, self.seed = bool(offload), float(init_std), int(seed)
        self.group, self.ddp_grad_scale = group, bool(ddp_grad_scale)
        if weight is not None and tuple(weight.shape) != (num_classes, embedding_dim):
            raise ValueError(
                f"classifier: weight has shape {tuple(weight.shape)}, expected "
                f"({num_classes}, {embedding_dim}) (num_classes, embedding_dim)"
            )
        self._initial = weight
        self._given: Sampler | None = sampler if isinstance(sampler, Sampler) else None
        self._factory = None if self._given is not None else sampler
        self.shard = bool(shard) and self._factory is not None
        if self._given is not None:
            check_sampler(self._given, self.num_classes, head.metric)
        self._num = int(num) if num is not None else (self._given.num if self._given else None)
        if self._num is not None and not 1 <= self._num <= self.num_classes:
            raise ValueError(f"classifier: num (M) = {num} must be in 1..{self.num_classes}")
        self.rank, self.world_size = 0, 1
        self._store: RowStore | None = None
        self._sampler: Sampler | None = None
        self._device = torch.device("cpu")

    # -- rows and sampler, made on first use -----------------------------------------------
    def _ensure(self) -> RowStore:
        rank, size = coll.world(self.group) if self.shard else (0, 1)
        if self._store is not None and (rank, size) == (self.rank, self.world_size):
            return self._store
        if self._store is not None and self.world_size != 1:
            raise RuntimeError(
                f"classifier was built for rank {self.rank} of {self.world_size} but now runs "
                f"as rank {rank} of {size}; reload a consolidated checkpoint"
            )
        start, end = coll.shard_range(self.num_classes, size, rank)
        if end <= start:
            raise ValueError(f"classifier: N = {self.num_classes} classes cannot be split over "
                             f"{size} ranks (rank {rank} would own none)")  # fmt: skip
        kw = dict(mu=self.momentum, weight_decay=self.weight_decay, offload=self.offload)
        state = None
        if self._store is not None:  # made before the process group existed: keep its rows
            store, state = self._store.sliced(start, end), self._sampler.state_dict()
        elif self._initial is not None:
            store = RowStore(self._initial[start:end] if size > 1 else self._initial, start, **kw)
        else:
            w = initial_rows(start, end, self.num_classes, self.embedding_dim, self.init_std,
                             self.seed)  # fmt: skip
            store = RowStore(w, start, **kw)
        self.rank, self.world_size = rank, size
        self._sampler = self._make_sampler(end - start, state)
        store.place(self._device)
        self._store = store
        log.debug("rank %d/%d owns classes [%d, %d)", rank, size, start, end)
        return store

    def _make_sampler(self, n: int, state: dict | None) -> Sampler:
        if self._factory is None:  # a built Sampler: never sharded
            return self._given
        sampler, self._num = shard_sampler(self._factory, n, self._num, self.metric, self.seed,
                                           self.world_size, self.rank)  # fmt: skip
        if state is not None:
            sampler.load_state_dict({**state, "num": sampler.num})
        return sampler

    @property
    def sampler(self) -> Sampler:
        """This rank's sampler over its classes (local ids 0..N_r-1; all N on one process)."""
        self._ensure()
        return self._sampler

    @sampler.setter
    def sampler(self, value: Sampler) -> None:
        """Swap in another built Sampler over this rank's classes (tests, experiments)."""
        self._sampler = check_sampler(value, self._ensure().num_rows, self.metric)

    @property
    def store(self) -> RowStore:
        """This rank's RowStore (rows [start, end); all N on one process), made on first use."""
        return self._ensure()

    @property
    def weight(self) -> torch.Tensor:
        """This rank's rows W (N_r, D) (all N on one process); read-only view of the store."""
        return self._ensure().weight

    @property
    def metric(self) -> str:
        return self.head.metric

    @property
    def num(self) -> int:
        """M: active classes per step summed over ranks (the ``num_schedule`` sets it)."""
        if self._num is None:
            self._ensure()
        return self._num

    @num.setter
    def num(self, value: int) -> None:
        value = int(value)
        if not 1 <= value <= self.num_classes:
            raise ValueError(f"classifier: num (M) = {value} must be in 1..{self.num_classes}")
        self._num = value
        if self._store is not None:
            self._sampler.num = local_num(value, self._store.num_rows, self.world_size, self.rank)

    # -- placement -------------------------------------------------------------------------
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        super()._apply(fn, recurse)
        self._ensure().apply_(fn)
        if not self.offload:
            self._device = self._store.weight.device
        return self

    def place(self, device: torch.device | str) -> None:
        """Rows where they live for compute on ``device``: there, or (offload) in host memory,
        pinned for CUDA, with only W[A] (M_r, D) copied per step."""
        self._device = torch.device(device)
        self.head.to(self._device)
        self._ensure().place(self._device)

    # -- training --------------------------------------------------------------------------
    def selects_ahead(self, device: torch.device | None = None) -> bool:
        """Whether ``forward`` selects the next step ahead (label-mode sampler, one process,
        ``prefetch`` true, or auto with offloaded rows on a CUDA ``device``)."""
        store = self._ensure()
        if self.world_size != 1 or not self._sampler.selects_ahead or self.prefetch is False:
            return False
        device = torch.device(device) if device is not None else self._device
        return self.prefetch is True or (store.offload and device.type == "cuda")

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor, next_labels: torch.Tensor | None = None
    ) -> ClassifierOutput:
        """features (B_r, D), labels (B_r,) int64 in 0..N-1 -> ClassifierOutput (collective
        under DDP). next_labels: the next batch's labels (B',) (selection ahead), or None."""
        store = self._ensure()
        labels = labels.to(features.device, torch.int64).view(-1)
        feats, all_labels = features, labels  # (B, D), (B,): every rank's samples
        if self.world_size > 1:
            scale = float(self.world_size) if self.ddp_grad_scale else 1.0
            feats, all_labels = coll.gather_batch(features, labels, self.group, scale)
        if self.world_size == 1:
            active = self.ahead.take(self._sampler, all_labels)
            if active is None:
                store.staged = None
                active = self._sampler.select(feats.detach(), all_labels)
        else:  # local ids; targets into them or -1
            active = select_in_shard(self._sampler, feats.detach(), all_labels, *store.range)
        leaf = store.gather(active.ids, features.device)  # W[A_r] (M_r, D)
        if next_labels is not None and next_labels.numel() and self.selects_ahead(feats.device):
            store.prefetch(self.ahead.select(self._sampler, next_labels).ids, feats.device)
        targets = active.targets.to(features.device, non_blocking=True)
        logits = margin_logits(self.head, feats, leaf, targets)
        if active.logit_adjust is not None:  # sampling correction (loss only; see Sampler)
            logits = logits + active.logit_adjust.to(logits.device, logits.dtype)
        if self.world_size == 1:
            loss = F.cross_entropy(logits, targets)
        else:  # float32 softmax statistics even when autocast made the logits bf16
            loss = coll.DistributedCrossEntropy.apply(logits.float(), targets, self.group)
        hit = plain_hit(self.head, feats, leaf, targets, self.group, self.world_size > 1)
        shown = dataclasses.replace(active, ids=active.ids + store.start)
        rows = leaf if leaf.requires_grad else None
        return ClassifierOutput(loss, logits, targets, shown, hit.float().mean(), rows, active.ids)

    @torch.no_grad()
    def step(self, out: ClassifierOutput, lr: float) -> None:
        """After backward: SGD momentum + weight decay on the rows of ``out`` only (lazy).

        No-op when the forward kept no gradient; a second step on the same output raises.
        """
        if out.stepped:
            raise RuntimeError("classifier.step: this output's rows were already updated")
        if out.rows is None or out.rows.grad is None:
            return
        self._ensure().step_(out.row_ids, out.rows.grad, lr)
        out.stepped = True

    def nonfinite_rows(self, out: ClassifierOutput) -> list[int]:
        """Up to 10 global ids of ``out``'s rows that hold NaN/Inf now (after the step)."""
        store = self._ensure()
        with torch.no_grad():
            ok = torch.isfinite(store.weight[out.row_ids.to(store.weight.device)]).all(dim=1)
        return (out.row_ids[~ok.cpu()][:10] + store.start).tolist()

    # -- index support (local to the rank) -------------------------------------------------
    def snapshot_weights(self) -> np.ndarray:
        """(N_r, D) float32 CPU copy of this rank's rows (its sampler's index is built on it)."""
        return self._ensure().snapshot()

    def pop_touched(self) -> np.ndarray:
        """Sorted LOCAL ids updated since the last call; resets the mask."""
        return self._ensure().pop_touched()

    @torch.no_grad()
    def predict(self, features: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
        """features (B_r, D) -> (B_r,) int64 argmax over all N classes on the plain logits,
        rows chunked; under DDP a collective: the best of the ranks' bests (ties: lowest id)."""
        store = self._ensure()
        if self.world_size == 1:
            return store.argmax(features, self.head, chunk_size)[1]
        feats, sizes = coll.gather_rows_of_batch(features, self.group)
        best, best_ids = store.argmax(feats, self.head, chunk_size)
        return coll.my_rows(coll.merge_argmax(best, best_ids, self.group), sizes, self.rank)

    @torch.no_grad()
    def topk(self, features: torch.Tensor, k: int, chunk_size: int = 65536) -> torch.Tensor:
        """features (B_r, D) -> (B_r, k) int64 class ids of the k best plain logits over all N
        classes, best first (k capped at N); a collective under DDP."""
        store, k = self._ensure(), min(int(k), self.num_classes)
        if self.world_size == 1:
            return store.topk(features, self.head, k, chunk_size)[1]
        feats, sizes = coll.gather_rows_of_batch(features, self.group)
        values, ids = store.topk(feats, self.head, k, chunk_size)  # (B, k_r), k_r <= k
        return coll.my_rows(coll.merge_topk(values, ids, k, self.group), sizes, self.rank)

    # -- consolidated checkpoint -----------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        state = self._ensure().state()
        self.ahead.undo(self._sampler)  # saved as before the selection made ahead
        self._store.staged = None
        for key in ("weight", "momentum", "num_updates", "touched"):
            value = state[key]
            if self.world_size > 1 and key != "num_updates":
                value = coll.consolidate(value, self.num_classes, self.group)
            destination[prefix + key] = value
        for key, value in sampler_tensors(self._sampler, self.num).items():
            destination[prefix + key] = value  # rank 0's RNG stream

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        store = self._ensure()
        self.ahead.undo(None)
        found = {k: state_dict[prefix + k] for k in _KEYS if prefix + k in state_dict}
        # a dense checkpoint (sampler=full) has no momentum: it starts at zero
        missing_keys += [prefix + k for k in _KEYS if strict and k not in found and k != "momentum"]
        store.load_full_(found, self.num_classes, prefix, error_msgs)
        if "sampler_counters" in found:
            self.num = min(max(int(found["sampler_counters"][0]), 1), self.num_classes)
            load_sampler_tensors(self._sampler, found, self.rank)
        own = {prefix + k for k in _KEYS}
        rest = {k: v for k, v in state_dict.items() if k not in own}
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        shard = f", rank={self.rank}/{self.world_size}" if self.world_size > 1 else ""
        return (f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
                f"num={self._num}, offload={self.offload}{shard}")  # fmt: skip
