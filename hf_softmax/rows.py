"""Host/accelerator row store: gather W[A], place rows, lazy sparse SGD on rows.

The plain functions both ``SampledClassifier`` and ``ShardedClassifier`` use on the rows they
keep outside autograd: ``weight`` W (N, D), its ``momentum`` (N, D) and a ``touched`` (N,)
bool mask. N is all classes for the single-process classifier, the shard's N_r for the
sharded one; ids are row indices into these tensors.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

import numpy as np
import torch

from hf_softmax.heads import MarginHead


def place_rows(
    weight: torch.Tensor, momentum: torch.Tensor, device: torch.device, offload: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, momentum) where they live for compute on ``device``.

    Offload: host memory, pinned when ``device`` is CUDA so the per-step gathers can copy
    asynchronously. Otherwise both move to ``device``.
    """
    if not offload:
        return weight.to(device), momentum.to(device)
    weight, momentum = weight.to("cpu"), momentum.to("cpu")
    if device.type == "cuda" and not weight.is_pinned():
        weight, momentum = weight.pin_memory(), momentum.pin_memory()
    return weight, momentum


def gather_rows(weight: torch.Tensor, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """ids (M,) CPU int64 -> W[ids] (M, D) on ``device``."""
    if weight.device == device:
        return weight.index_select(0, ids.to(device))
    if weight.device.type == "cpu" and device.type == "cuda":
        # Fresh pinned buffer from torch's caching host allocator: it records the copy's
        # stream, so the buffer is not reused before the async copy has finished.
        buf = torch.empty((ids.numel(), weight.shape[1]), dtype=weight.dtype, pin_memory=True)
        torch.index_select(weight, 0, ids, out=buf)
        return buf.to(device, non_blocking=True)
    return weight.index_select(0, ids.to(weight.device)).to(device)


def gather_leaf(weight: torch.Tensor, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """W[ids] (M, D) on ``device`` as a fresh autograd leaf; it requires grad only when grad
    is enabled, so backward fills ``.grad`` for ``sparse_sgd_``."""
    return gather_rows(weight, ids, device).detach().requires_grad_(torch.is_grad_enabled())


@torch.no_grad()
def sparse_sgd_(
    weight: torch.Tensor,
    momentum: torch.Tensor,
    ids: torch.Tensor,
    grad: torch.Tensor,
    lr: float,
    mu: float,
    weight_decay: float,
) -> None:
    """In place on the rows ``ids`` (M,) only, grad (M, D) on any device:
    ``g = grad + wd * w;  v = mu * v + g;  w -= lr * v`` (torch SGD, dampening 0)."""
    ids_w = ids.to(weight.device)
    grad = grad.to(weight.device, weight.dtype)  # offload: (M, D) device -> host
    w = weight.index_select(0, ids_w)  # (M, D) copies
    g = grad.add(w, alpha=weight_decay) if weight_decay else grad
    v = momentum.index_select(0, ids_w).mul_(mu).add_(g)
    momentum.index_copy_(0, ids_w, v)
    weight.index_copy_(0, ids_w, w.add_(v, alpha=-lr))


def step_pending_(
    pending: tuple[torch.Tensor, torch.Tensor] | None,
    weight: torch.Tensor,
    momentum: torch.Tensor,
    touched: torch.Tensor,
    lr: float,
    mu: float,
    weight_decay: float,
) -> bool:
    """The last forward's ``(ids (M,), leaf (M, D))`` -> ``sparse_sgd_`` on those rows with the
    leaf's gradient, rows marked in ``touched``. False (nothing done) without a pending
    forward or without a gradient."""
    if pending is None:
        return False
    ids, leaf = pending
    if leaf.grad is None:
        return False
    sparse_sgd_(weight, momentum, ids, leaf.grad, lr, mu, weight_decay)
    touched[ids] = True
    return True


def snapshot_rows(weight: torch.Tensor) -> np.ndarray:
    """(N, D) float32 CPU copy of W for index building (safe to read from a thread)."""
    return weight.detach().to("cpu", torch.float32, copy=True).numpy()


def pop_touched(touched: torch.Tensor) -> np.ndarray:
    """touched (N,) bool -> sorted ids set in it (int64); clears the mask."""
    ids = torch.nonzero(touched).view(-1).numpy().astype(np.int64)
    touched.zero_()
    return ids


@torch.no_grad()
def argmax_rows(
    features: torch.Tensor, weight: torch.Tensor, head: MarginHead, chunk_size: int, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """features (B, D), W (N, D) -> (best plain logit (B,), its row id + ``offset`` (B,) int64).

    Rows go to the features' device ``chunk_size`` at a time; ties keep the lowest id.
    """
    best = torch.full((features.shape[0],), -float("inf"), device=features.device)
    best_ids = torch.zeros(features.shape[0], dtype=torch.int64, device=features.device)
    w = weight.detach()
    for start in range(0, w.shape[0], chunk_size):
        rows = w[start : start + chunk_size].to(features.device, non_blocking=True)
        value, idx = head.plain_logits(features, rows).max(dim=1)
        better = value > best  # strict: ties keep the lowest id, like argmax
        best = torch.where(better, value.to(best.dtype), best)
        best_ids = torch.where(better, idx + start + offset, best_ids)
    return best, best_ids


@torch.no_grad()
def topk_rows(
    features: torch.Tensor, weight: torch.Tensor, head: MarginHead, k: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """features (B, D), W (N, D) -> (k best plain logits (B, k), their row ids (B, k) int64),
    best first; k is capped at N.

    Rows go to the features' device ``chunk_size`` at a time (W may be memory-mapped or in
    host memory); the running top-k is merged with each chunk's. ``argmax_rows`` is the k = 1
    case with its tie rule (lowest id); here ties within the k best may come in any order.
    """
    k = min(int(k), weight.shape[0])
    best = torch.full((features.shape[0], k), -float("inf"), device=features.device)
    best_ids = torch.zeros((features.shape[0], k), dtype=torch.int64, device=features.device)
    w = weight.detach()
    for start in range(0, w.shape[0], chunk_size):
        rows = w[start : start + chunk_size].to(features.device, non_blocking=True)
        logits = head.plain_logits(features, rows)  # (B, c)
        value, idx = logits.topk(min(k, logits.shape[1]), dim=1)
        merged = torch.cat([best, value.to(best.dtype)], dim=1)  # (B, k + k')
        merged_ids = torch.cat([best_ids, idx + start], dim=1)
        best, pos = merged.topk(k, dim=1)
        best_ids = merged_ids.gather(1, pos)
    return best, best_ids


# -- checkpoint ------------------------------------------------------------------------------
def pick_state(
    state_dict: Mapping[str, torch.Tensor],
    prefix: str,
    names: Iterable[str],
    strict: bool,
    missing_keys: list[str],
    optional: Collection[str] = (),
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """-> ({prefix + name: name} for ``names``, {name: value} for those in ``state_dict``).

    With ``strict``, an absent name not in ``optional`` goes to ``missing_keys``.
    """
    own = {prefix + name: name for name in names}
    found = {}
    for key, name in own.items():
        if key in state_dict:
            found[name] = state_dict[key]
        elif strict and name not in optional:
            missing_keys.append(key)
    return own, found


@torch.no_grad()
def load_rows_(
    targets: Mapping[str, torch.Tensor | None],
    found: Mapping[str, torch.Tensor],
    shape: tuple[int, int],
    rows: slice,
    prefix: str,
    expects: str,
    error_msgs: list[str],
) -> None:
    """Copy ``found[name][rows]`` into ``targets[name]`` (keeps device and pinning) for each
    name present, e.g. ``weight`` and ``momentum``; a checkpoint tensor whose shape is not
    ``shape`` (num_classes, embedding_dim) goes to ``error_msgs`` instead, with ``expects``
    naming the loader (``"classifier expects"``)."""
    for name, target in targets.items():
        if name not in found:
            continue
        value = found[name]
        if tuple(value.shape) != shape:
            error_msgs.append(
                f"size mismatch for {prefix}{name}: checkpoint has {tuple(value.shape)}, "
                f"{expects} {shape} (num_classes, embedding_dim)"
            )
            continue
        target.copy_(value[rows])
