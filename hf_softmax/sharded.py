"""ShardedClassifier: the sampled classifier split by class across torch.distributed ranks.

Same public methods as :class:`hf_softmax.classifier.SampledClassifier` (``forward``,
``sparse_step``, ``snapshot_weights``, ``pop_touched``, ``predict``, ``place``, state dict),
so ``HFSoftmaxModule`` and the ``IndexRebuild`` callback can use either. Works with gloo
(CPU) and nccl (GPU); with one process (or no process group) it is a plain sampled
classifier and issues no collectives.

Layout: rank r of a world of size R owns the contiguous block of classes
``[start_r, end_r)`` (balanced split of N), their rows W_r (N_r, D) and momentum, and its own
sampler whose index covers only the shard (local ids 0..N_r-1). The rows are never
``nn.Parameter``s, so DDP's gradient all-reduce never sees them; the backbone stays
data-parallel.

One step (every rank, in lockstep)::

    features (B_r, D), labels (B_r,)           this rank's samples
    all-gather -> F (B, D), Y (B,)             B = sum of B_r; backward sums every rank's
                                               partial dL/dF and keeps this rank's rows
    select in the shard: M_r = M // R (+1 for the first M % R ranks) active local ids:
        positives (Y inside [start_r, end_r)), then nearest neighbours of F from the
        local index, then random local classes
    logits (B, M_r) = head(F, W_r[A_r]); margin only on rows whose target is local
    distributed softmax cross-entropy (DistributedCrossEntropy): all-reduce MAX of the
        row max, all-reduce SUM of the sum of exponentials and of the target logit
        (zero where the target is on another rank); loss = mean(logsumexp - target)
    sparse_step(lr): SGD momentum + weight decay on the rows A_r of this shard only

The loss equals the single-process cross-entropy over the union of the ranks' active sets
(tests/test_sharded.py checks loss and gradients against ``SampledClassifier``).

Gradient scale: DDP averages the backbone gradients over ranks. The all-gather backward
therefore multiplies this rank's feature gradient by R (``ddp_grad_scale``), as InsightFace's
Partial FC does, so the backbone receives dL/dtheta of the global-batch loss, the same
gradient a single process would compute on the concatenated batch. The rows' gradients are
exact (no scaling): each shard's rows only appear in that shard's logits.

Checkpoints are consolidated: ``state_dict()`` gathers every shard's rows, momentum and
touched mask to rank 0 (in row chunks, so a GPU gather never needs O(N) accelerator memory)
and writes full (N, D) tensors under the keys ``SampledClassifier`` uses; other ranks write
empty (0, D) tensors (Lightning saves rank 0's dict only). ``state_dict()`` is therefore a
collective: call it on every rank (``trainer.save_checkpoint`` does). Loading slices this
rank's block from the full tensors, so a checkpoint resumes with any world size and loads into
a single-process ``SampledClassifier`` for evaluation.

The ``full`` sampler (dense) is supported as "every local class is active every step": the
rows are still updated by ``sparse_step``, which on all rows is exactly torch's SGD.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from hf_softmax import rows as row_store
from hf_softmax.classifier import HeadOutput
from hf_softmax.heads import MarginHead
from hf_softmax.samplers.base import ActiveSet, Sampler

log = logging.getLogger(__name__)

__all__ = [
    "DistributedCrossEntropy",
    "ShardedClassifier",
    "ShardedHeadOutput",
    "all_gather_with_grad",
    "shard_range",
    "split_count",
    "use_sharded",
]

SamplerFactory = Callable[[int, int, int], Sampler]  # (num_classes N_r, num M_r, seed) -> Sampler
_INIT_BLOCK = 65536  # rows per independently seeded init block (world-size invariant init)
_GATHER_ELEMENTS = 1 << 24  # elements per rank per consolidation chunk (64 MiB of fp32)


# -- layout ----------------------------------------------------------------------------------
def split_count(total: int, world: int, rank: int) -> int:
    """Balanced share of ``total`` for ``rank``: the first ``total % world`` ranks get one more."""
    return total // world + (1 if rank < total % world else 0)


def shard_range(num_classes: int, world: int, rank: int) -> tuple[int, int]:
    """[start, end) of the classes owned by ``rank`` (contiguous, balanced)."""
    start = sum(split_count(num_classes, world, r) for r in range(rank))
    return start, start + split_count(num_classes, world, rank)


def _world(group: Any) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _comm_device(group: Any, fallback: torch.device) -> torch.device:
    """nccl moves CUDA tensors only; gloo (and the rest) CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback if fallback.type == "cpu" else torch.device("cpu")


# -- collectives with autograd ---------------------------------------------------------------
class _AllGather(torch.autograd.Function):
    """(B_r, D) per rank -> (B, D) concatenated in rank order; backward: sum over ranks, slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int, scale: float, group: Any):
        ctx.sizes, ctx.rank, ctx.scale, ctx.group = sizes, rank, scale, group
        return _all_gather_plain(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank's logits read every sample: this sample's gradient is the sum of the
        # partial gradients of all ranks. (all_reduce, not reduce_scatter: gloo lacks it.)
        sizes, bmax = ctx.sizes, max(ctx.sizes)
        padded = grad.new_zeros((len(sizes), bmax, *grad.shape[1:]))
        offset = 0
        for r, s in enumerate(sizes):
            padded[r, :s] = grad[offset : offset + s]
            offset += s
        dist.all_reduce(padded, op=dist.ReduceOp.SUM, group=ctx.group)
        out = padded[ctx.rank, : sizes[ctx.rank]]
        return (out * ctx.scale if ctx.scale != 1.0 else out), None, None, None, None


def _gather_sizes(n: int, device: torch.device, group: Any) -> list[int]:
    world = dist.get_world_size(group)
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in sizes]


def _all_gather_plain(x: torch.Tensor, sizes: list[int], group: Any) -> torch.Tensor:
    bmax = max(sizes)
    padded = x.new_zeros((bmax, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])


def all_gather_with_grad(
    x: torch.Tensor, group: Any = None, scale: float = 1.0, sizes: list[int] | None = None
) -> torch.Tensor:
    """x (B_r, ...) on each rank -> (sum B_r, ...) in rank order; differentiable.

    Backward gives each rank ``scale *`` the sum over ranks of the gradient of its own rows.
    Batch sizes may differ between ranks (``sizes`` saves one tiny collective if known).
    """
    rank, world = _world(group)
    if world == 1:
        return x
    if sizes is None:
        sizes = _gather_sizes(x.shape[0], x.device, group)
    return _AllGather.apply(x.contiguous(), sizes, rank, float(scale), group)


class DistributedCrossEntropy(torch.autograd.Function):
    """Softmax cross-entropy whose classes are split over ranks, gradient written by hand.

    forward(logits (B, M_r), targets (B,) int64 in 0..M_r-1 or -1 where the target class is
    on another rank, group) -> loss scalar: mean over B. Every rank gets the same loss.

    backward: d loss / d logits = (softmax - onehot_local) / B, with the softmax normalised by
    the global max and sum of exponentials saved from forward; no collective is needed.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, group: Any):
        batch, m = logits.shape
        distributed = _world(group)[1] > 1
        with torch.no_grad():
            if m:
                row_max = logits.max(dim=1).values.clone()
            else:
                row_max = logits.new_full((batch,), -float("inf"))
            if distributed:
                dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
            probs = (logits - row_max[:, None]).exp_()  # (B, M_r)
            local = targets >= 0
            rows = torch.nonzero(local).view(-1)
            # [sum of exponentials; target logit] in one all-reduce
            stats = logits.new_zeros((2, batch))
            stats[0] = probs.sum(dim=1)
            stats[1, rows] = logits[rows, targets[rows]]
            if distributed:
                dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
            sum_exp, target_logit = stats[0], stats[1]
            loss = (sum_exp.log() + row_max - target_logit).mean()
            probs.div_(sum_exp[:, None])
        ctx.save_for_backward(probs, targets)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        probs, targets = ctx.saved_tensors
        grad = probs.clone()
        rows = torch.nonzero(targets >= 0).view(-1)
        grad[rows, targets[rows]] -= 1.0
        grad.mul_(grad_loss / probs.shape[0])
        return grad, None, None


# -- the classifier --------------------------------------------------------------------------
@dataclass
class ShardedHeadOutput(HeadOutput):
    """HeadOutput of one rank. loss: the global loss (same on every rank); logits (B, M_r)
    over the gathered batch B and this rank's active classes; targets (B,) local indices into
    the M_r columns, -1 where the target class lives on another rank; active: this rank's
    ActiveSet with **global** class ids (M_r,) and those targets; rows: the W_r[A_r] leaf.
    accuracy: top-1 over the union of the active sets on the plain logits (no margin): the
    global argmax == target, scalar (``_plain_hit``).
    local_ids: (M_r,) the same ids local to the shard (indices into ``weight``)."""

    local_ids: torch.Tensor | None = None


def _init_rows(
    start: int, end: int, num_classes: int, dim: int, std: float, seed: int
) -> torch.Tensor:
    """Rows [start, end) of the initial (num_classes, dim) W, whatever the sharding.

    Rows come in whole blocks of ``_INIT_BLOCK`` seeded by (seed, block), so every world size
    starts from the same consolidated W and no rank ever materialises all N rows.
    """
    out = torch.empty(end - start, dim)
    block = start // _INIT_BLOCK
    while block * _INIT_BLOCK < end:
        b0, b1 = block * _INIT_BLOCK, (block + 1) * _INIT_BLOCK
        lo, hi = max(b0, start), min(b1, end)
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + block)
        rows = torch.empty(min(b1, num_classes) - b0, dim).normal_(0.0, std, generator=gen)
        out[lo - start : hi - start] = rows[lo - b0 : hi - b0]
        block += 1
    return out


class ShardedClassifier(nn.Module):
    """N-way sampled classifier whose rows are split by class over the ranks of ``group``.

    num_classes: N; num: M, the active classes per step summed over ranks (ignored with the
    dense ``full`` sampler: all N); sampler: a factory ``(N_r, M_r, seed) -> Sampler`` or the
    ``sampler`` config node (``build_sampler`` is called with ``num`` replaced by M_r), built
    once the rank is known; seeds differ per rank. The shard is created lazily on first use
    (``place``, ``forward``, loading, ``sampler``), i.e. after Lightning has set up the process
    group, so the module can be constructed before launch.
    ddp_grad_scale: multiply this rank's feature gradient by the world size (undoes DDP's
    gradient averaging, see the module docstring); turn off for plain dL/dfeatures.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        num: int,
        sampler: SamplerFactory | Mapping[str, Any],
        head: MarginHead,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        offload: bool = False,
        init_std: float = 0.01,
        seed: int = 0,
        group: Any = None,
        ddp_grad_scale: bool = True,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.embedding_dim = int(embedding_dim)
        self.head = head
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.offload = bool(offload)
        self.init_std = float(init_std)
        self.seed = int(seed)
        self.group = group
        self.ddp_grad_scale = bool(ddp_grad_scale)
        if isinstance(sampler, Mapping):
            self._sampler_factory: SamplerFactory = _config_factory(dict(sampler), head.metric)
            self.all_active = sampler.get("name") == "full"
        else:
            self._sampler_factory = sampler
            self.all_active = False  # known once built (sampler.dense)
        self._num = self.num_classes if self.all_active else int(num)
        if not 1 <= self._num <= self.num_classes:
            raise ValueError(
                f"sharded classifier: num (M) = {num} must be in 1..num_classes (N = {num_classes})"
            )
        if offload and self.all_active:
            raise ValueError("classifier: offload needs a sampled (non-dense) sampler, got 'full'")
        self.dense = False  # rows are never Parameters here, whatever the sampler
        self.rank, self.world_size, self.start, self.end = 0, 1, 0, self.num_classes
        self._sampler: Sampler | None = None
        self.weight: torch.Tensor | None = None  # (N_r, D) this rank's rows
        self.momentum_buffer: torch.Tensor | None = None
        self._touched: torch.Tensor | None = None
        self._device = torch.device("cpu")
        self.num_updates = 0
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._warned_grow = False

    # -- shard life cycle ------------------------------------------------------------------
    def _ensure_shard(self) -> None:
        rank, world = _world(self.group)
        if self.weight is not None:
            if (rank, world) == (self.rank, self.world_size):
                return
            if self.world_size != 1:
                raise RuntimeError(
                    f"sharded classifier was built for rank {self.rank} of {self.world_size} "
                    f"but now runs as rank {rank} of {world}; reload a consolidated checkpoint"
                )
        start, end = shard_range(self.num_classes, world, rank)
        local = end - start
        if local < 1:
            raise ValueError(
                f"sharded classifier: N = {self.num_classes} classes cannot be split over "
                f"{world} ranks (rank {rank} would own none)"
            )
        if self.weight is not None:  # built before the process group existed: keep its rows
            w = self.weight[start:end].clone()
            v = self.momentum_buffer[start:end].clone()
            touched = self._touched[start:end].clone()
            sampler_state = self._sampler.state_dict()
        else:
            w = _init_rows(
                start, end, self.num_classes, self.embedding_dim, self.init_std, self.seed
            )
            v = torch.zeros_like(w)
            touched = torch.zeros(local, dtype=torch.bool)
            sampler_state = None
        self.rank, self.world_size, self.start, self.end = rank, world, start, end
        m_local = local if self.all_active else split_count(self._num, world, rank)
        sampler = self._sampler_factory(local, max(1, min(m_local, local)), self._rank_seed())
        if sampler.num_classes != local:
            raise ValueError(
                f"sharded classifier: sampler factory gave num_classes={sampler.num_classes}, "
                f"expected the shard size {local}"
            )
        if sampler.metric != self.head.metric:
            raise ValueError(
                f"sharded classifier: sampler metric {sampler.metric!r} does not match head "
                f"{type(self.head).__name__} metric {self.head.metric!r}"
            )
        if sampler.dense and not self.all_active:
            self.all_active, self._num = True, self.num_classes
        if sampler_state is not None:
            sampler.load_state_dict({**sampler_state, "num": sampler.num})
        self._sampler = sampler
        self.weight, self.momentum_buffer, self._touched = w, v, touched
        self._place_rows(self._device)
        log.debug("rank %d/%d owns classes [%d, %d)", rank, world, start, end)

    def _rank_seed(self) -> int:
        return self.seed + 1009 * self.rank

    @property
    def sampler(self) -> Sampler:
        """This rank's sampler over the shard (local ids 0..N_r-1)."""
        self._ensure_shard()
        return self._sampler

    @property
    def num(self) -> int:
        """M: active classes per step summed over ranks."""
        return self._num

    @num.setter
    def num(self, value: int) -> None:
        """Change M (a ``num_schedule``); this rank's sampler gets its share."""
        value = int(value)
        if self.all_active:
            return
        if not 1 <= value <= self.num_classes:
            raise ValueError(
                f"sharded classifier: num (M) = {value} must be in 1..{self.num_classes}"
            )
        self._num = value
        if self._sampler is not None:
            local = self.end - self.start
            self._sampler.num = max(1, min(split_count(value, self.world_size, self.rank), local))

    @property
    def metric(self) -> str:
        return self.head.metric

    @property
    def num_local(self) -> int:
        return self.end - self.start

    # -- placement -------------------------------------------------------------------------
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        super()._apply(fn, recurse)
        if self.weight is not None and not self.offload:
            self.weight = fn(self.weight)
            self.momentum_buffer = fn(self.momentum_buffer)
            self._device = self.weight.device
        return self

    def _place_rows(self, device: torch.device) -> None:
        self.weight, self.momentum_buffer = row_store.place_rows(
            self.weight, self.momentum_buffer, device, self.offload
        )

    def place(self, device: torch.device | str) -> None:
        """Non-offload: this shard's rows move to ``device``. Offload: they stay in host
        memory, pinned for CUDA, and only W_r[A_r] (M_r, D) is copied per step."""
        self._device = torch.device(device)
        self.head.to(self._device)
        self._ensure_shard()
        self._place_rows(self._device)

    # -- training --------------------------------------------------------------------------
    def _gather_batch(
        self, features: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_r, D), (B_r,) -> all ranks' (B, D) (differentiable), (B,) on features' device."""
        labels = labels.to(features.device, torch.int64).view(-1)
        if self.world_size == 1:
            return features, labels
        sizes = _gather_sizes(features.shape[0], features.device, self.group)
        scale = float(self.world_size) if self.ddp_grad_scale else 1.0
        feats = all_gather_with_grad(features, self.group, scale, sizes)
        return feats, _all_gather_plain(labels, sizes, self.group)

    def select(self, features: torch.Tensor, labels: torch.Tensor) -> ActiveSet:
        """Gathered features (B, D) (detached), global labels (B,) -> this rank's ActiveSet:
        ids (M_r,) LOCAL to the shard, targets (B,) into them or -1 where not local."""
        labels = labels.detach().to("cpu", torch.int64)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"sharded classifier: labels must be in 0..{self.num_classes - 1}, got min "
                f"{int(labels.min())} max {int(labels.max())} (gathered over all ranks)"
            )
        local = (labels >= self.start) & (labels < self.end)
        sampler = self._sampler
        num_pos = int(torch.unique(labels[local]).numel())
        restore = None
        if num_pos > sampler.num:  # more positives here than this rank's share: take them all
            if not self._warned_grow:
                self._warned_grow = True
                log.info(
                    "rank %d: %d positives in the shard exceed its share M_r = %d; the active "
                    "set grows for such steps (raise sampler.num to avoid this)",
                    self.rank,
                    num_pos,
                    sampler.num,
                )
            restore, sampler.num = sampler.num, num_pos
        try:
            active = sampler.select(features, labels[local] - self.start)
        finally:
            if restore is not None:
                sampler.num = restore
        targets = torch.full_like(labels, -1)
        targets[local] = active.targets
        # the shard's logq correction estimates the shard's share of the normaliser; the
        # distributed softmax sums the shards, so the adjustments carry over unchanged
        return ActiveSet(active.ids, targets, active.num_positives, active.num_index,
                         active.logit_adjust)  # fmt: skip

    def _margin_logits(
        self, feats: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """(B, D), (M_r, D), (B,) with -1 = not local -> (B, M_r), margin at local targets only.

        The head puts the margin at column ``targets``; rows whose target is elsewhere get
        column 0 as a stand-in, whose plain logit is then written back.
        """
        if rows.shape[0] == 0:
            return feats.new_zeros((feats.shape[0], 0))
        logits = self.head(feats, rows, targets.clamp(min=0))
        other = torch.nonzero(targets < 0).view(-1)
        if other.numel() == 0 or getattr(self.head, "margin", 0.0) == 0.0:
            return logits
        plain0 = self.head.plain_logits(feats.index_select(0, other), rows[:1])  # (b, 1)
        col0 = logits[:, :1].index_copy(0, other, plain0.to(logits.dtype))
        return torch.cat([col0, logits[:, 1:]], dim=1)

    @torch.no_grad()
    def _plain_hit(
        self, feats: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """(B, D), (M_r, D), (B,) local targets or -1 -> (B,) bool: the target's plain logit
        (no margin) is the maximum over all ranks' active rows (collective).

        One all-reduce (MAX) of [row max; target logit, -inf where the target is elsewhere]:
        every target lives on exactly one rank.
        """
        stats = feats.new_full((2, feats.shape[0]), -float("inf"), dtype=torch.float32)
        if rows.shape[0]:
            plain = self.head.plain_logits(feats.detach(), rows.detach()).float()  # (B, M_r)
            stats[0] = plain.max(dim=1).values
            local = torch.nonzero(targets >= 0).view(-1)
            stats[1, local] = plain[local, targets[local]]
        if self.world_size > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=self.group)
        return stats[1] >= stats[0]

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> ShardedHeadOutput:
        """features (B_r, D), labels (B_r,) global ids -> ShardedHeadOutput (collective)."""
        self._ensure_shard()
        feats, all_labels = self._gather_batch(features, labels)  # (B, D), (B,)
        active = self.select(feats.detach(), all_labels)
        device = features.device
        leaf = row_store.gather_leaf(self.weight, active.ids, device)  # W_r[A_r] (M_r, D)
        track = leaf.requires_grad
        targets = active.targets.to(device, non_blocking=True)
        logits = self._margin_logits(feats, leaf, targets)
        if active.logit_adjust is not None:  # sampling correction (loss only)
            logits = logits + active.logit_adjust.to(logits.device, logits.dtype)
        # float32 softmax statistics even when autocast made the logits bf16
        loss = DistributedCrossEntropy.apply(logits.float(), targets, self.group)
        hit = self._plain_hit(feats, leaf, targets)
        self._pending = (active.ids, leaf) if track else None
        global_set = ActiveSet(active.ids + self.start, active.targets, active.num_positives)
        return ShardedHeadOutput(
            loss=loss,
            logits=logits,
            targets=targets,
            active=global_set,
            rows=leaf if track else None,
            accuracy=hit.float().mean(),
            local_ids=active.ids,
        )

    @torch.no_grad()
    def sparse_step(self, lr: float) -> None:
        """After backward: SGD momentum + weight decay on this shard's active rows only.

        ``g = grad + wd * w;  v = mu * v + g;  w -= lr * v`` (torch SGD, dampening 0).
        """
        pending, self._pending = self._pending, None
        w, v, touched = self.weight, self.momentum_buffer, self._touched
        if row_store.step_pending_(pending, w, v, touched, lr, self.momentum, self.weight_decay):
            self.num_updates += 1

    # -- index support (all local to the shard) --------------------------------------------
    def snapshot_weights(self) -> np.ndarray:
        """(N_r, D) float32 CPU copy of this shard's rows (the local index is built from it)."""
        self._ensure_shard()
        return row_store.snapshot_rows(self.weight)

    def pop_touched(self) -> np.ndarray:
        """Sorted LOCAL ids updated since the last call; resets the mask."""
        self._ensure_shard()
        if self.all_active:
            return np.arange(self.num_local, dtype=np.int64)
        return row_store.pop_touched(self._touched)

    @torch.no_grad()
    def predict(self, features: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
        """features (B_r, D) -> (B_r,) int64 argmax over all N classes (collective).

        Features are gathered; each rank finds the best of its shard; the best over ranks
        wins (ties: the lowest class id, like argmax).
        """
        self._ensure_shard()
        batch = features.shape[0]
        sizes = None
        if self.world_size > 1:
            sizes = _gather_sizes(batch, features.device, self.group)
            features = _all_gather_plain(features, sizes, self.group)
        best, best_ids = row_store.argmax_rows(
            features, self.weight, self.head, chunk_size, offset=self.start
        )
        if self.world_size == 1:
            return best_ids
        values = [torch.empty_like(best) for _ in range(self.world_size)]
        ids = [torch.empty_like(best_ids) for _ in range(self.world_size)]
        dist.all_gather(values, best, group=self.group)
        dist.all_gather(ids, best_ids, group=self.group)
        winner = torch.stack(values).argmax(dim=0)  # first maximal rank = lowest ids
        chosen = torch.stack(ids).gather(0, winner[None]).view(-1)
        offset = sum(sizes[: self.rank])
        return chosen[offset : offset + batch]

    # -- consolidated checkpoint -----------------------------------------------------------
    def _consolidate(self, local: torch.Tensor) -> torch.Tensor:
        """(N_r, ...) on each rank -> (N, ...) on rank 0 (CPU), (0, ...) elsewhere.

        Collective. Chunked by rows so nccl never holds more than ``_GATHER_ELEMENTS`` per rank.
        """
        tail = tuple(local.shape[1:])
        if self.world_size == 1:  # like SampledClassifier: no copy of host-memory rows
            return local.detach().cpu()
        dtype = torch.uint8 if local.dtype == torch.bool else local.dtype
        device = _comm_device(self.group, torch.device("cpu"))
        counts = [split_count(self.num_classes, self.world_size, r) for r in range(self.world_size)]
        width = int(np.prod(tail)) if tail else 1
        step = max(1, _GATHER_ELEMENTS // max(width, 1))
        is_root = self.rank == 0
        out = torch.empty((self.num_classes if is_root else 0, *tail), dtype=dtype)
        starts = np.cumsum([0, *counts[:-1]])
        for c0 in range(0, max(counts), step):
            c1 = min(c0 + step, max(counts))
            chunk = torch.zeros((c1 - c0, *tail), dtype=dtype, device=device)
            mine = local[c0:c1].detach()
            chunk[: mine.shape[0]] = mine.to(device, dtype)
            parts = [torch.empty_like(chunk) for _ in counts] if is_root else None
            dist.gather(chunk, parts, dst=dist.get_global_rank(self.group, 0)
                        if self.group is not None else 0, group=self.group)  # fmt: skip
            if is_root:
                for r, part in enumerate(parts):
                    n = max(0, min(c1, counts[r]) - c0)
                    if n:
                        out[starts[r] + c0 : starts[r] + c0 + n] = part[:n].cpu()
        return out.to(torch.bool) if local.dtype == torch.bool else out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        self._ensure_shard()
        destination[prefix + "weight"] = self._consolidate(self.weight)
        destination[prefix + "momentum"] = self._consolidate(self.momentum_buffer)
        s = self._sampler.state_dict()
        destination[prefix + "num_updates"] = torch.tensor(self.num_updates, dtype=torch.int64)
        destination[prefix + "touched"] = self._consolidate(self._touched)
        destination[prefix + "sampler_rng"] = s["rng"].clone()  # rank 0's stream
        destination[prefix + "sampler_counters"] = torch.tensor(
            [self._num, s["num_selects"], s["num_fallbacks"], s["num_swaps"]], dtype=torch.int64
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        self._ensure_shard()
        keys = ("weight", "momentum", "num_updates", "touched", "sampler_rng", "sampler_counters")
        # a dense single-process checkpoint has no momentum
        own, found = row_store.pick_state(
            state_dict, prefix, keys, strict, missing_keys, optional=("momentum",)
        )
        row_store.load_rows_(
            {"weight": self.weight, "momentum": self.momentum_buffer},
            found,
            (self.num_classes, self.embedding_dim),
            slice(self.start, self.end),
            prefix,
            "sharded classifier expects the consolidated",
            error_msgs,
        )
        if "num_updates" in found:
            self.num_updates = int(found["num_updates"])
        if "touched" in found and found["touched"].numel() == self.num_classes:
            self._touched.copy_(found["touched"][self.start : self.end].to(torch.bool))
        if "sampler_counters" in found:
            num, selects, fallbacks, swaps = (int(x) for x in found["sampler_counters"])
            if not self.all_active:
                self.num = min(max(num, 1), self.num_classes)
            state = self._sampler.state_dict()
            state.update(num_selects=selects, num_fallbacks=fallbacks, num_swaps=swaps)
            if "sampler_rng" in found:
                state["rng"] = found["sampler_rng"]
            self._sampler.load_state_dict(state)
            if self.rank:  # rank 0 continues the saved stream; the others fork from it
                fork = int(torch.randint(2**62, (1,), generator=self._sampler.generator))
                self._sampler.generator.manual_seed(fork + self.rank)
        rest = {k: v for k, v in state_dict.items() if k not in own}
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, num={self._num}, "
            f"rank={self.rank}/{self.world_size}, shard=[{self.start}, {self.end}), "
            f"offload={self.offload}, all_active={self.all_active}"
        )


def _config_factory(cfg: dict[str, Any], metric: str) -> SamplerFactory:
    """The ``sampler`` config node -> factory building it over a shard with M_r."""

    def build(num_classes: int, num: int, seed: int) -> Sampler:
        from hf_softmax.samplers import build_sampler

        return build_sampler({**cfg, "num": num}, num_classes, metric, seed)

    return build


def use_sharded(cfg: Mapping[str, Any]) -> bool:
    """Whether ``HFSoftmaxModule`` should build a ``ShardedClassifier`` for this config.

    ``classifier.sharded``: true | false | "auto" (default): auto = the trainer's strategy is a
    DDP strategy (``trainer=ddp``), where the classifier is split by class over the ranks.
    """
    value = (cfg.get("classifier") or {}).get("sharded", "auto")
    if isinstance(value, str) and value.lower() == "auto":
        strategy = (cfg.get("trainer") or {}).get("strategy", "")
        return isinstance(strategy, str) and strategy.startswith("ddp")
    if isinstance(value, str):
        return value.lower() in ("true", "1", "yes")
    return bool(value)
