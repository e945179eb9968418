"""The recall probe: how many of the true nearest rows the serving index (or table) returns.

Feature mode: recall@k of ``sampler.query`` on a step's features (B, D) against exact top-k
(``samplers.exact.exact_topk``) over ``weights``; k is ``probe_k``, or the k the last
selection used. Label mode (``sampler.query=label``, a table installed): recall of the table
rows of the last batch's classes against their exact K nearest other rows in ``weights``
(``class_table.table_recall``, k = ``table_k``). Either way: the index's misses and the rows'
drift since the build together.

``IndexMaintainer`` probes every ``probe_every`` steps, after the step, with ``weights`` the
rows as that step's selection saw them: the step's own update is undone
(``RowStore.snapshot(as_selected=True)``). Against the updated rows, the negatives the step
served would count as misses just because the step pushed them away from these features
(0.84 for an exact index rebuilt before every step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from hf_softmax.class_table import table_recall
from hf_softmax.samplers.exact import exact_topk, recall_at_k


def measure_recall(
    sampler: Any,
    weights: np.ndarray,
    features: torch.Tensor | np.ndarray,
    probe_k: int | None = None,
    chunk_size: int = 65536,
) -> tuple[float, int, Callable[[int], float] | None]:
    """(recall, k, recall_at) of ``sampler``'s serving index (feature mode) or table (label
    mode) against exact neighbours over ``weights`` (N, D) float32 (see the module
    docstring); features (B, D). ``recall_at(effort)`` (feature mode): the same features
    queried again at another query effort, against the same exact top-k (``target_recall``
    tunes the effort with it). The sampler is back at its own effort after each call; only
    the training thread queries, so no step sees the other effort. Label mode: None (the
    table was built at one effort)."""
    table = getattr(sampler, "table", None)
    if getattr(sampler, "query_mode", "feature") == "label" and table is not None:
        recall = table_recall(table, weights, sampler.last_positives, sampler.metric, chunk_size)
        return recall, int(table.shape[1]), None
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float32).numpy()
    feats = np.ascontiguousarray(features, dtype=np.float32)
    k = probe_k if probe_k is not None else (sampler.last_k or 10)
    k = min(k, sampler.num_classes)
    exact = exact_topk(weights, feats, k, sampler.metric, chunk_size)

    def recall_at(effort: int | None = None) -> float:
        if effort is None:
            return recall_at_k(sampler.query(feats, k), exact)
        own = sampler.effort
        sampler.effort = effort
        try:
            return recall_at_k(sampler.query(feats, k), exact)
        finally:
            sampler.effort = own

    return recall_at(), k, recall_at
