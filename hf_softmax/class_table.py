"""The class-neighbour table of label-driven selection (``sampler.query=label``).

At every rebuild the build job also asks the fresh index for each class's K nearest classes
by weight row (K = ``sampler.table_k``): an (N, K) int32 table, N * K * 4 bytes (64 MB at
N = 10^6, K = 16), -1 where the index found fewer. A step's active set is then the batch's
positives plus the union of their table rows, rank-major (rank 0 of every positive first),
deduplicated, positives removed, trimmed: a lookup of O(B * K), no index query in the step.
The positives are taken in batch order (``batch_order``), as feature mode takes its samples:
in sorted order a budget smaller than the batch would only ever serve the lowest class ids.
It needs only the labels, so the step can be selected ahead (``classifier.prefetch``).

``sampler.feature_share`` = s > 0 mixes in the paper's per-feature query: the first
ceil(s * B) samples of the batch query the index with their features for s of the index's
share of M (``Sampler.select``), the table fills the rest. A table is per class; the
confusions are per image (each image's nearest wrong rows differ with its font, pose,
lighting), and only a feature query finds those. It costs s of feature mode's query, and the
step can no longer be selected ahead (it needs the features).

The table asks the index about its own rows (``Sampler.query_rows``): annoy by item id
(``get_nns_by_item``, no vector conversion, GIL released) over the build threads; hnsw and
exact by the rows' vectors, batched (hnsw's C++ threads; exact's chunked matmul, its batch
capped so one chunk of scores stays ~256 MB).

``table_recall`` measures a table against exact top-K over the current rows: the recall
probe of label mode (it sees both the index's misses and the rows' drift since the build).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

QUERY_MODES = ("feature", "label")
TABLE_BATCH = 4096  # rows queried per call while building a table


def check_label_knobs(
    name: str, query: str, table_k: int, feature_share: float = 0.0, table_trees: int = 0
) -> tuple[str, int, float, int]:
    """-> (query, table_k, feature_share, table_trees) of sampler ``name``, or ValueError
    naming the expected values."""
    if query not in QUERY_MODES:
        raise ValueError(f"sampler {name!r}: query must be one of {QUERY_MODES}, got {query!r}")
    if int(table_k) < 1:
        raise ValueError(f"sampler {name!r}: table_k must be >= 1, got {table_k}")
    if not 0.0 <= float(feature_share) <= 1.0:
        raise ValueError(f"sampler {name!r}: feature_share must be in [0, 1], got {feature_share}")
    if int(table_trees) < 0:
        raise ValueError(f"sampler {name!r}: table_trees must be >= 0 (0: the table from the "
                         f"index), got {table_trees}")  # fmt: skip
    return str(query), int(table_k), float(feature_share), int(table_trees)


def drop_self(ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """ids (n, K + 1) neighbours of the rows ``rows`` (n,) -> (n, K): each row's own id removed,
    or its last neighbour where the index did not return it (inner product need not rank a
    row first for itself)."""
    n, k1 = ids.shape
    own = ids == rows[:, None]
    missing = ~own.any(axis=1)
    own[missing, k1 - 1] = True
    first = own.cumsum(axis=1) == 1
    keep = ~(own & first)  # one removal per row, even if -1 padding repeats
    return ids[keep].reshape(n, k1 - 1)


def neighbour_table(
    query_rows: Callable[[np.ndarray, int], np.ndarray],
    n: int,
    k: int,
    batch: int = TABLE_BATCH,
) -> np.ndarray:
    """-> (n, k) int32: each of the n rows' k nearest other rows by ``query_rows`` (row ids
    (b,), k -> (b, k) ids, nearest first, -1 padded: the index's neighbours of its own rows),
    rows queried ``batch`` at a time."""
    k = max(0, min(int(k), n - 1))
    out = np.full((n, k), -1, dtype=np.int32)
    if k == 0:
        return out
    for start in range(0, n, batch):
        rows = np.arange(start, min(n, start + batch), dtype=np.int64)
        ids = np.asarray(query_rows(rows, k + 1), dtype=np.int64)
        out[start : start + len(rows)] = drop_self(ids, rows)
    return out


def batch_order(labels: Any) -> np.ndarray:
    """The batch's classes (unique) in the order they first occur in ``labels`` (B,): the
    order the table rows are taken in, so that trimming drops the classes the loader happened
    to put last, never the classes with the highest ids."""
    flat = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels).reshape(-1)
    _, first = np.unique(flat, return_index=True)
    return flat[np.sort(first)].astype(np.int64, copy=False)


def table_candidates(
    table: np.ndarray, order: np.ndarray, want: int, positives: np.ndarray | None = None
) -> np.ndarray:
    """Up to ``want`` ids from the table rows of the classes ``order`` (P,) unique, in the
    order given, not themselves positives (``positives``: the same set, any order; default
    ``order``), rank-major (every class's rank 0 first), first occurrence kept."""
    positives = order if positives is None else positives
    if want <= 0 or order.size == 0 or table.shape[1] == 0:
        return np.empty(0, dtype=np.int64)
    cand = np.ascontiguousarray(table[order].T).reshape(-1).astype(np.int64)
    cand = cand[cand >= 0]
    _, first = np.unique(cand, return_index=True)
    cand = cand[np.sort(first)]
    cand = cand[~np.isin(cand, positives)]
    return cand[:want]


def table_recall(
    table: np.ndarray, weights: np.ndarray, ids: np.ndarray, metric: str, chunk_size: int = 65536
) -> float:
    """Recall of ``table[ids]`` against the exact K nearest other rows of ``weights`` (N, D)
    for the classes ``ids`` (n,)."""
    from hf_softmax.samplers.exact import exact_topk, recall_at_k

    ids = np.unique(np.asarray(ids, dtype=np.int64))
    k = table.shape[1]
    if ids.size == 0 or k == 0:
        return float("nan")
    exact = exact_topk(weights, weights[ids], k + 1, metric, chunk_size)
    return recall_at_k(table[ids].astype(np.int64), drop_self(exact, ids))
