"""``exact``: brute-force top-k by chunked matmul over all rows — the oracle for recall.

The "index" is a float32 torch copy of the snapshot (rows L2-normalised for ``cosine``).
Per query batch it costs O(B * N * D) flops, chunked so memory stays O(B * chunk_size).
``exact_topk`` is the same computation as a function, used to measure ANN recall.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hf_softmax.class_table import TABLE_BATCH
from hf_softmax.samplers.base import Sampler

TABLE_SCORES = 1 << 26  # float32 scores per table query chunk (256 MB)


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    return t.detach().to(torch.float32)


def exact_topk(
    weights: np.ndarray | torch.Tensor,
    queries: np.ndarray | torch.Tensor,
    k: int,
    metric: str = "ip",
    chunk_size: int = 65536,
    normalized: bool = False,
) -> np.ndarray:
    """weights (N, D), queries (B, D) -> (B, k) int64 ids of the k best rows, best first.

    metric "ip": largest inner product; "cosine": largest cosine (rows and queries normalised;
    ``normalized=True`` says the rows already are). k > N pads with -1.
    """
    w = _as_tensor(weights)
    q = _as_tensor(queries).to(w.device)
    n = w.shape[0]
    if metric == "cosine":
        q = F.normalize(q, dim=1)
    elif metric != "ip":
        raise ValueError(f"exact_topk: metric must be 'ip' or 'cosine', got {metric!r}")
    kk = min(k, n)
    best_scores, best_ids = [], []
    for start in range(0, n, chunk_size):
        rows = w[start : start + chunk_size]
        if metric == "cosine" and not normalized:
            rows = F.normalize(rows, dim=1)
        scores = q @ rows.t()  # (B, chunk)
        s, i = scores.topk(min(kk, rows.shape[0]), dim=1)
        best_scores.append(s)
        best_ids.append(i + start)
    scores = torch.cat(best_scores, dim=1)
    ids = torch.cat(best_ids, dim=1)
    s, pos = scores.topk(kk, dim=1)
    out = ids.gather(1, pos).cpu().numpy().astype(np.int64)
    if kk < k:
        out = np.concatenate([out, np.full((out.shape[0], k - kk), -1, np.int64)], axis=1)
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """found (B, k), truth (B, k) ids -> mean fraction of each truth row found (ignores -1)."""
    hits = total = 0
    for f, t in zip(found, truth, strict=True):
        t = t[t >= 0]
        hits += np.isin(t, f).sum()
        total += t.size
    return float(hits) / max(total, 1)


class ExactSampler(Sampler):
    name = "exact"
    dense = False
    needs_index = True
    inline_build = True  # a build is a normalised copy of W

    def __init__(
        self,
        num_classes: int,
        num: int,
        metric: str = "ip",
        seed: int = 0,
        chunk_size: int = 65536,
        **selection: Any,
    ) -> None:
        super().__init__(num_classes, num, metric, seed, **selection)
        self.chunk_size = int(chunk_size)

    def build_index(self, weights: np.ndarray) -> torch.Tensor:
        """(N, D) -> (N, D) float32 tensor copy (normalised rows for cosine)."""
        w = torch.from_numpy(np.array(weights, dtype=np.float32, copy=True))
        return F.normalize(w, dim=1) if self.metric == "cosine" else w

    def query(self, features: np.ndarray, k: int) -> np.ndarray:
        return self.query_index(self._index, features, k)

    @property
    def table_batch(self) -> int:
        """Table rows per call: one chunk of scores (batch, chunk_size) stays ~256 MB."""
        chunk = min(self.chunk_size, self.num_classes)
        return max(64, min(TABLE_BATCH, TABLE_SCORES // max(chunk, 1)))

    def query_index(self, index: torch.Tensor | None, features: np.ndarray, k: int) -> np.ndarray:
        """features (B, D) -> (B, k) ids of the best rows of ``index`` (from ``build_index``)."""
        if index is None:
            raise RuntimeError("sampler 'exact': query before the first build")
        return exact_topk(index, features, k, self.metric, self.chunk_size, normalized=True)
