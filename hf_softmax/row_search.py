"""Search over all rows: the best (``argmax_rows``) or k best (``topk_rows``) classes for features.

Chunked over W (n, D), which may be memory-mapped, offloaded to host memory or on the device:
``chunk_size`` rows go to the features' device at a time. Used for prediction by both
classifiers (``RowStore.argmax``/``topk``, ``DenseClassifier``) and by closed-set evaluation.
"""

from __future__ import annotations

import torch

from hf_softmax.heads import MarginHead


@torch.no_grad()
def argmax_rows(
    features: torch.Tensor, weight: torch.Tensor, head: MarginHead, chunk_size: int, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """features (B, D), W (n, D) -> (best plain logit (B,), its row id + ``offset`` (B,) int64).

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
    features: torch.Tensor,
    weight: torch.Tensor,
    head: MarginHead,
    k: int,
    chunk_size: int,
    offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """features (B, D), W (n, D) -> (k best plain logits (B, k), their row ids + ``offset``
    (B, k) int64), best first; k is capped at n.

    Rows go to the features' device ``chunk_size`` at a time (W may be memory-mapped or in
    host memory); the running top-k is merged with each chunk's. Ties within the k best may
    come in any order (``argmax_rows`` keeps the lowest id).
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
        merged_ids = torch.cat([best_ids, idx + start + offset], dim=1)
        best, pos = merged.topk(k, dim=1)
        best_ids = merged_ids.gather(1, pos)
    return best, best_ids
