"""The collectives of the class-sharded classifier, each the identity on one process.

- ``shard_range`` / ``split_count``: rank r of R owns the contiguous, balanced block of
  classes [start_r, end_r) and M_r = its share of the M active classes;
- ``world`` / ``gather_sizes`` / ``all_gather_plain``: process-group plumbing;
- ``all_gather_with_grad``: (B_r, D) per rank -> (B, D); backward sums every rank's partial
  gradient of a sample and (``scale = R``) undoes DDP's gradient averaging, as InsightFace's
  Partial FC does;
- ``softmax_cross_entropy``: plain ``F.cross_entropy`` on one process, else
  ``DistributedCrossEntropy`` (the softmax normaliser summed over the ranks' classes);
- ``consolidate``: a per-rank (N_r, ...) tensor -> the full (N, ...) on rank 0, chunked.

World size 1 (or no initialised process group) issues no collective anywhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

GATHER_ELEMENTS = 1 << 24  # elements per rank per consolidation chunk (64 MiB of fp32)


def split_count(total: int, world: int, rank: int) -> int:
    """Balanced share of ``total`` for ``rank``: the first ``total % world`` ranks get one more."""
    return total // world + (1 if rank < total % world else 0)


def shard_range(num_classes: int, world: int, rank: int) -> tuple[int, int]:
    """[start, end) of the classes owned by ``rank`` (contiguous, balanced)."""
    start = sum(split_count(num_classes, world, r) for r in range(rank))
    return start, start + split_count(num_classes, world, rank)


def world(group: Any = None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def rank0_object(obj: Any, group: Any = None) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank of ``group``; ``obj`` itself without an
    initialised process group or with one rank."""
    if world(group)[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group else 0,
                               group=group)  # fmt: skip
    return box[0]


def comm_device(group: Any, fallback: torch.device) -> torch.device:
    """nccl moves CUDA tensors only; gloo (and the rest) CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback if fallback.type == "cpu" else torch.device("cpu")


def gather_sizes(n: int, device: torch.device, group: Any = None) -> list[int]:
    """Every rank's ``n`` (e.g. its batch size), in rank order."""
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in sizes]


def all_gather_plain(x: torch.Tensor, sizes: list[int], group: Any = None) -> torch.Tensor:
    """x (sizes[rank], ...) per rank -> (sum(sizes), ...) in rank order; no autograd."""
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])


class _AllGather(torch.autograd.Function):
    """(B_r, D) per rank -> (B, D) concatenated in rank order; backward: sum over ranks, slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int, scale: float, group: Any):
        ctx.sizes, ctx.rank, ctx.scale, ctx.group = sizes, rank, scale, group
        return all_gather_plain(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank's logits read every sample: this sample's gradient is the sum of the
        # partial gradients of all ranks. (all_reduce, not reduce_scatter: gloo lacks it.)
        sizes = ctx.sizes
        padded = grad.new_zeros((len(sizes), max(sizes), *grad.shape[1:]))
        offset = 0
        for r, s in enumerate(sizes):
            padded[r, :s] = grad[offset : offset + s]
            offset += s
        dist.all_reduce(padded, op=dist.ReduceOp.SUM, group=ctx.group)
        out = padded[ctx.rank, : sizes[ctx.rank]]
        return (out * ctx.scale if ctx.scale != 1.0 else out), None, None, None, None


def all_gather_with_grad(
    x: torch.Tensor, group: Any = None, scale: float = 1.0, sizes: list[int] | None = None
) -> torch.Tensor:
    """x (B_r, ...) on each rank -> (sum B_r, ...) in rank order; differentiable.

    Backward gives each rank ``scale *`` the sum over ranks of the gradient of its own rows.
    Batch sizes may differ between ranks (``sizes`` saves one tiny collective if known).
    The identity on one process.
    """
    rank, size = world(group)
    if size == 1:
        return x
    if sizes is None:
        sizes = gather_sizes(x.shape[0], x.device, group)
    return _AllGather.apply(x.contiguous(), sizes, rank, float(scale), group)


class DistributedCrossEntropy(torch.autograd.Function):
    """Softmax cross-entropy whose classes are split over ranks, gradient written by hand.

    forward(logits (B, M_r), targets (B,) int64 in 0..M_r-1 or -1 where the target class is
    on another rank, group) -> loss scalar: mean over B. Every rank gets the same loss:
    all-reduce MAX of the row max, then one all-reduce SUM of [sum of exponentials; target
    logit (0 where the target is elsewhere)]; loss = mean(logsumexp - target logit).

    backward: d loss / d logits = (softmax - onehot_local) / B, with the softmax normalised by
    the global max and sum of exponentials saved from forward; no collective is needed.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, group: Any):
        batch, m = logits.shape
        distributed = world(group)[1] > 1
        with torch.no_grad():
            if m:
                row_max = logits.max(dim=1).values.clone()
            else:
                row_max = logits.new_full((batch,), -float("inf"))
            if distributed:
                dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
            probs = (logits - row_max[:, None]).exp_()  # (B, M_r)
            rows = torch.nonzero(targets >= 0).view(-1)
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


def softmax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, group: Any = None):
    """logits (B, M_r), targets (B,) (-1: on another rank) -> mean cross-entropy over the
    union of the ranks' columns. One process: ``F.cross_entropy``; else the distributed
    softmax in float32 (even when autocast made the logits bf16)."""
    if world(group)[1] == 1:
        return F.cross_entropy(logits, targets)
    return DistributedCrossEntropy.apply(logits.float(), targets, group)


def all_reduce_max_(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """In place: element-wise max over the ranks (no-op on one process)."""
    if world(group)[1] > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def consolidate(local: torch.Tensor, num_classes: int, group: Any = None) -> torch.Tensor:
    """(N_r, ...) on each rank -> (N, ...) on rank 0 (CPU), (0, ...) elsewhere. Collective.

    Chunked by rows so nccl never holds more than ``GATHER_ELEMENTS`` per rank. On one process:
    ``local`` itself, detached (no copy).
    """
    rank, size = world(group)
    if size == 1:
        return local.detach()
    tail = tuple(local.shape[1:])
    dtype = torch.uint8 if local.dtype == torch.bool else local.dtype
    device = comm_device(group, torch.device("cpu"))
    counts = [split_count(num_classes, size, r) for r in range(size)]
    width = int(np.prod(tail)) if tail else 1
    step = max(1, GATHER_ELEMENTS // max(width, 1))
    is_root = rank == 0
    out = torch.empty((num_classes if is_root else 0, *tail), dtype=dtype)
    starts = np.cumsum([0, *counts[:-1]])
    root = dist.get_global_rank(group, 0) if group is not None else 0
    for c0 in range(0, max(counts), step):
        c1 = min(c0 + step, max(counts))
        chunk = torch.zeros((c1 - c0, *tail), dtype=dtype, device=device)
        mine = local[c0:c1].detach()
        chunk[: mine.shape[0]] = mine.to(device, dtype)
        parts = [torch.empty_like(chunk) for _ in counts] if is_root else None
        dist.gather(chunk, parts, dst=root, group=group)
        if is_root:
            for r, part in enumerate(parts):
                n = max(0, min(c1, counts[r]) - c0)
                if n:
                    out[starts[r] + c0 : starts[r] + c0 + n] = part[:n].cpu()
    return out.to(torch.bool) if local.dtype == torch.bool else out


def all_gather_stack(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """(B, ...) of the same shape on every rank -> (R, B, ...)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


def gather_rows_of_batch(features: torch.Tensor, group: Any = None):
    """features (B_r, ...) -> (every rank's (B, ...) in rank order, the sizes B_r)."""
    sizes = gather_sizes(features.shape[0], features.device, group)
    return all_gather_plain(features, sizes, group), sizes


def my_rows(x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    """(B, ...) over the gathered batch -> this rank's (B_r, ...)."""
    offset = sum(sizes[:rank])
    return x[offset : offset + sizes[rank]]


def merge_argmax(best: torch.Tensor, best_ids: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Each rank's best value (B,) and class id (B,) -> the id of the best over the ranks
    (B,); ties go to the lowest rank, i.e. the lowest id."""
    values, ids = all_gather_stack(best, group), all_gather_stack(best_ids, group)  # (R, B)
    winner = values.argmax(dim=0)  # first maximal rank
    return ids.gather(0, winner[None]).view(-1)


def merge_topk(values: torch.Tensor, ids: torch.Tensor, k: int, group: Any = None):
    """Each rank's k_r <= k best values (B, k_r) and class ids -> the ids of the k best over
    the ranks (B, k), best first."""
    pad = k - values.shape[1]  # a shard smaller than k: pad with -inf
    values = F.pad(values, (0, pad), value=-float("inf"))
    ids = F.pad(ids, (0, pad), value=-1)
    values = torch.cat(list(all_gather_stack(values, group)), dim=1)  # (B, R * k)
    ids = torch.cat(list(all_gather_stack(ids, group)), dim=1)
    return ids.gather(1, values.topk(k, dim=1).indices)


def gather_batch(features: torch.Tensor, labels: torch.Tensor, group: Any, scale: float):
    """features (B_r, D), labels (B_r,) -> every rank's (B, D) (differentiable, backward
    scaled by ``scale``) and (B,), in rank order."""
    sizes = gather_sizes(features.shape[0], features.device, group)
    feats = all_gather_with_grad(features, group, scale, sizes)
    return feats, all_gather_plain(labels, sizes, group)
