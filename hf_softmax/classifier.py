"""SampledClassifier: W outside autograd in a RowStore, a softmax over M active rows per step.

One step, on one process or on every rank of a process group in lockstep::

    out = classifier(features, labels)   features (B_r, D), labels (B_r,) this rank's samples
    out.loss.backward()                  grads of the features and of the leaf rows W[A]
    classifier.step(out, lr)             sparse SGD on the rows A (RowStore.step_, row_update)

``forward``: the sampler picks M active classes; logits (B, M) = head(F, W[A]); loss =
``F.cross_entropy``; the ``ClassifierOutput`` holds what the update needs (the leaf rows,
their ids). With ``next_labels`` (label mode) it also selects the next step ahead and stages
its rows (``select_ahead``, ``row_prefetch``). Under DDP (``shard=True``, R > 1 ranks) each
rank owns a block of classes (``hf_softmax.shard``, made on first use): the batch is
all-gathered, each rank picks M_r of its classes and the loss is the distributed softmax
cross-entropy. Checkpoints are consolidated (``classifier_state``): any world size resumes.
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
from hf_softmax.classifier_state import checkpoint_tensors, load_sampler_tensors, split_checkpoint
from hf_softmax.heads import MarginHead
from hf_softmax.output import ClassifierOutput
from hf_softmax.row_store import RowStore
from hf_softmax.row_update import check_row_momentum, resolve_row_norm
from hf_softmax.samplers.base import Sampler
from hf_softmax.select_ahead import SelectAhead
from hf_softmax.shard import (
    SamplerFactory,
    best_classes,
    check_sampler,
    local_num,
    margin_logits,
    plain_hit,
    rank_store,
    select_in_shard,
    shard_sampler,
)

log = logging.getLogger(__name__)


class SampledClassifier(nn.Module):
    """N-way classifier whose rows live in a RowStore and are updated sparsely.

    sampler: a built ``Sampler`` over all N classes (then never sharded), or a factory called
    with ``num_classes=N_r, metric=, seed=`` (and ``num=M_r`` when ``num`` is known) that
    builds the sampler of the rank's classes; seeds are ``seed + 1009 * rank``.
    num: M, active classes per step summed over ranks (default: the sampler's).
    weight: initial W (N, D) float32, used in place (device and pinning kept; sliced under
    DDP); default N(0, ``init_std``) by seeded blocks (``row_store.initial_rows``).
    prefetch: "auto" | True | False: select ahead (``select_ahead``; auto: CUDA + offload).
    row_norm (r | None), row_momentum ("lazy" | "immediate"): how rows move (``row_update``).
    shard: with a factory, split the rows over ``group``'s ranks when it has size > 1.
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
        row_norm: float | None = None,
        row_momentum: str = "lazy",
    ) -> None:
        super().__init__()
        self.ahead = SelectAhead(prefetch)
        if not isinstance(head, MarginHead):
            raise TypeError(f"classifier: head must be a MarginHead, got {type(head).__name__}")
        self.num_classes, self.embedding_dim = int(num_classes), int(embedding_dim)
        self.head = head
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.offload, self.init_std, self.seed = bool(offload), float(init_std), int(seed)
        self.group, self.ddp_grad_scale = group, bool(ddp_grad_scale)
        self.row_norm = resolve_row_norm(row_norm, head.metric)
        self.row_momentum = check_row_momentum(row_momentum)
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
        state = self._sampler.state_dict() if self._store is not None else None
        store = rank_store(self.num_classes, self.embedding_dim, size, rank, self._store,
                           self.world_size, self.rank, self._initial, self.init_std, self.seed,
                           mu=self.momentum, weight_decay=self.weight_decay, offload=self.offload,
                           row_norm=self.row_norm, row_momentum=self.row_momentum)  # fmt: skip
        self.rank, self.world_size = rank, size
        self._sampler = self._make_sampler(store.num_rows, state)
        store.place(self._device)
        self._store = store
        log.debug("rank %d/%d owns classes [%d, %d)", rank, size, *store.range)
        return store

    def _make_sampler(self, n: int, state: dict | None) -> Sampler:
        if self._factory is None:  # a built Sampler: never sharded
            return self._given
        sampler, self._num = shard_sampler(self._factory, n, self._num, self.metric, self.seed,
                                           self.world_size, self.rank, state)  # fmt: skip
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

    metric = property(lambda self: self.head.metric)  # the head's: "ip" | "cosine"

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
        device = torch.device(device) if device is not None else self._device
        return self.ahead.enabled(self._sampler, store.offload, device, self.world_size)

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
            active = self.ahead.current(self._sampler, store, feats, all_labels)
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
        """After backward: the sparse SGD of ``row_update`` on the rows of ``out`` only; a no-op
        when the forward kept no gradient; a second step on the same output raises."""
        if out.stepped:
            raise RuntimeError("classifier.step: this output's rows were already updated")
        if out.rows is None or out.rows.grad is None:
            return
        self._ensure().step_(out.row_ids, out.rows.grad, lr, out.rows)
        out.stepped = True

    def nonfinite_rows(self, out: ClassifierOutput) -> list[int]:
        """Up to 10 global ids of ``out``'s rows that hold NaN/Inf now (after the step)."""
        store = self._ensure()
        return (store.nonfinite(out.row_ids)[:10] + store.start).tolist()

    # -- index support (local to the rank) -------------------------------------------------
    def snapshot_weights(self, as_selected: bool = False) -> np.ndarray:
        """(N_r, D) float32 CPU copy of this rank's rows (``RowStore.snapshot``)."""
        return self._ensure().snapshot(as_selected)

    def pop_touched(self) -> np.ndarray:  # sorted LOCAL ids updated since the last call
        return self._ensure().pop_touched()

    @torch.no_grad()
    def predict(self, features: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
        """features (B_r, D) -> (B_r,) int64 argmax over all N classes on the plain logits,
        rows chunked; under DDP a collective: the best of the ranks' bests (ties: lowest id)."""
        return best_classes(self._ensure(), self.head, features, None, chunk_size, self.group,
                            self.world_size, self.rank)  # fmt: skip

    @torch.no_grad()
    def topk(self, features: torch.Tensor, k: int, chunk_size: int = 65536) -> torch.Tensor:
        """features (B_r, D) -> (B_r, k) int64 class ids of the k best plain logits over all N
        classes, best first (k capped at N); a collective under DDP."""
        return best_classes(self._ensure(), self.head, features, min(int(k), self.num_classes),
                            chunk_size, self.group, self.world_size, self.rank)  # fmt: skip

    # -- consolidated checkpoint -----------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        store = self._ensure()
        self.ahead.undo(self._sampler)  # saved as before the selection made ahead
        store.staged = None
        own = checkpoint_tensors(store, self._sampler, self.num, self.num_classes,
                                 self.world_size, self.group)  # fmt: skip
        destination.update({prefix + k: v for k, v in own.items()})

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        store = self._ensure()
        self.ahead.undo(None)
        found, rest, missing = split_checkpoint(state_dict, prefix, strict)
        missing_keys += missing
        store.load_full_(found, self.num_classes, prefix, error_msgs)
        if "sampler_counters" in found:
            self.num = min(max(int(found["sampler_counters"][0]), 1), self.num_classes)
            load_sampler_tensors(self._sampler, found, self.rank)
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        shard = f", rank={self.rank}/{self.world_size}" if self.world_size > 1 else ""
        return (f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
                f"num={self._num}, offload={self.offload}{shard}")  # fmt: skip
