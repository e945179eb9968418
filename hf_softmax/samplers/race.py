"""``sampler=auto``'s index race: which index reaches a target recall for the least query time.

``auto`` runs it once, on the first build's snapshot, when N x D is above
``exact_max_elements``, ``callbacks.index_rebuild.target_recall`` is set and it has more than
one ``candidates`` (annoy, faiss). For each candidate in turn:

1. build its index over the snapshot (timed);
2. take ``queries`` rows of the snapshot (seeded) as queries and find each one's k nearest
   *other* rows with the index, the way the run will query it (feature mode: by vector,
   ``query_index``, as a step does; label mode: ``query_rows``, as the table build does:
   annoy by item id), and with an exact top-k (``samplers.exact.exact_topk``); recall@k is
   the share found;
3. raise the index's query effort (annoy ``search_k``, faiss ``nprobe`` / ``efSearch``) from
   its default, doubling, up to the cap ``target_recall`` uses later (``max_factor`` x the
   default, never past ``effort_limit``: N, or faiss IVF's nlist), until recall reaches the
   target; time the queries at each effort (the median of up to 3 runs).

The winner is the candidate with the least query time per row at the target; the first
candidate (annoy: the paper's hashing forest) stays unless another is strictly cheaper.
Where none reaches the target, the highest recall wins. Each index is freed once measured,
so at most one is alive (at 10^7 x 128 an annoy index takes 6.4 GiB): the last candidate's
is handed back when it wins (it serves as the first build), any other winner is built again
by the first build. Rows stand in for features here (the step's features are not known
before the first step); they are also what a label-mode table asks for.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from hf_softmax.class_table import drop_self
from hf_softmax.recall_target import effort_cap
from hf_softmax.samplers.exact import exact_topk, recall_at_k

log = logging.getLogger(__name__)

_TIMED_RUNS = 3  # query timings per effort (median); 1 where one run takes over _LONG_S
_LONG_S = 0.5


@dataclass
class RaceEntry:
    """One candidate's result: build seconds, the effort reached, recall@k there, query ms
    per row at that effort, and every (effort, recall, ms) tried."""

    name: str
    build_s: float
    effort: int | None
    recall: float
    query_ms: float
    tried: list[tuple[int | None, float, float]]

    def reaches(self, target: float) -> bool:
        return self.recall >= target


def _timed_recall(
    sampler: Any, index: Any, weights: np.ndarray, ids: np.ndarray, exact: np.ndarray, k: int
) -> tuple[float, float]:
    """(recall@k of the index's k nearest other rows of ``ids``, ms per queried row)."""
    times: list[float] = []
    found = None
    while len(times) < _TIMED_RUNS:
        t0 = time.perf_counter()
        if sampler.query_mode == "label":  # as the class table is built
            found = sampler.query_rows(index, weights, ids, k + 1)
        else:  # as a step queries, by vector
            found = sampler.query_index(index, np.ascontiguousarray(weights[ids]), k + 1)
        times.append(time.perf_counter() - t0)
        if times[-1] > _LONG_S:
            break
    recall = recall_at_k(drop_self(np.asarray(found, np.int64), ids), exact)
    return recall, 1000.0 * float(np.median(times)) / len(ids)


def tune_effort(
    sampler: Any,
    index: Any,
    weights: np.ndarray,
    ids: np.ndarray,
    exact: np.ndarray,
    k: int,
    target: float,
    max_factor: int = 1024,
) -> tuple[int | None, float, float, list[tuple[int | None, float, float]]]:
    """Double ``sampler.effort`` from its default until recall@k >= target or the cap;
    leaves the sampler at the effort returned. -> (effort, recall, ms per row, tried)."""
    base = sampler.default_effort(k)
    tried: list[tuple[int | None, float, float]] = []
    if base is None:  # no effort knob (exact)
        recall, ms = _timed_recall(sampler, index, weights, ids, exact, k)
        return None, recall, ms, [(None, recall, ms)]
    cap = effort_cap(base, sampler.effort_limit, max_factor)
    effort = base
    while True:
        sampler.effort = effort
        recall, ms = _timed_recall(sampler, index, weights, ids, exact, k)
        tried.append((effort, recall, ms))
        if recall >= target or effort >= cap:
            return effort, recall, ms, tried
        effort = min(2 * effort, cap)


def race(
    candidates: dict[str, Any],
    weights: np.ndarray,
    target: float,
    k: int,
    queries: int = 256,
    seed: int = 0,
    chunk_size: int = 65536,
) -> tuple[str, Any, list[RaceEntry]]:
    """Build and tune every sampler of ``candidates`` (name -> Sampler, first = the default)
    over ``weights`` (N, D) float32 -> (winner, its index when it was the last built else
    None, entries in order). Each sampler is left at its tuned effort."""
    n = weights.shape[0]
    k = max(1, min(int(k), n - 1))
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(n, size=min(int(queries), n), replace=False)).astype(np.int64)
    metric = next(iter(candidates.values())).metric
    exact = drop_self(exact_topk(weights, weights[ids], k + 1, metric, chunk_size), ids)
    entries: list[RaceEntry] = []
    best: RaceEntry | None = None
    index: Any = None
    for name, sampler in candidates.items():
        index = None  # the previous candidate's is freed before this one builds
        t0 = time.perf_counter()
        index = sampler.build_index(weights)
        build_s = time.perf_counter() - t0
        effort, recall, ms, tried = tune_effort(sampler, index, weights, ids, exact, k, target)
        entry = RaceEntry(name, build_s, effort, recall, ms, tried)
        entries.append(entry)
        log.info("sampler 'auto' race: %s built in %.1fs; %s = %s gives recall@%d %.3f at "
                 "%.3f ms per query (target %.3f)", name, build_s,
                 getattr(sampler, "effort_knob", None), effort, k, recall, ms, target)  # fmt: skip
        if best is None or better(entry, best, target):
            best = entry
    assert best is not None
    return best.name, (index if best is entries[-1] else None), entries


def better(new: RaceEntry, old: RaceEntry, target: float) -> bool:
    """``new`` beats the earlier ``old``: it reaches the target and is strictly cheaper (or
    ``old`` misses it), or neither reaches it and ``new`` has the higher recall."""
    if new.reaches(target):
        return not old.reaches(target) or new.query_ms < old.query_ms
    return not old.reaches(target) and new.recall > old.recall
