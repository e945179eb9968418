"""``hnsw``: hierarchical navigable small-world graph (hnswlib).

Knobs: ``m`` (graph degree; memory and build cost grow with it), ``ef_construction`` (build
beam), ``ef`` (query beam; raise for recall), ``num_threads`` (build and query threads,
-1 = all cores), ``refresh_fraction`` (a refresh touching more than this fraction of the rows
does a full build instead: 0.1, below the break-even, ~12% at 10^5 x 256 where a 10% refresh
took 0.7x a full build and 30% 2.7x; ``bench.index_cost``), ``refresh_in_place`` and
``build_threads`` (see below).
Metric: "ip" -> hnswlib ``ip``; "cosine" -> ``cosine`` (hnswlib normalises rows and queries).

Cost: full build O(N log N * m * D), ~380 s for 10^6 x 256 with m=16, ef_construction=100 on
2 cores; query batched in C++ over the whole batch (``knn_query`` with num_threads).

Refresh. hnswlib ``add_items`` with an existing label replaces that vector and repairs its
links, so only the rows updated since a graph was built need work; it releases the GIL, a
copy or a load of a graph (``hnswlib.Index(index)``, ``load_index``) does not (0.2 s at
10^5 x 256, ~10x that at 10^6). But it mutates the graph a concurrent ``knn_query`` may be
walking. Default (``refresh_in_place: false``): two graphs take turns. ``refresh`` updates
the spare one, the graph the last swap took out of service, with every row it lacks (the
rows updated since its own last refresh: two rebuild intervals' worth), then the caller
``swap``s it in and the serving graph becomes the spare. Queries never wait and no graph is
ever copied, at the price of a second graph in memory and of a refresh that re-inserts two
intervals' rows. The spare is first made by ``ready_for_refresh`` (a copy, before the
first step; ``IndexMaintainer.start`` calls it); a refresh without one is a full build.
``refresh_in_place: true`` updates the serving graph under the sampler lock, which every
query also takes: one graph, one interval's rows, but queries block while it runs (the
build worker of ``background: process`` refreshes its own graph so: nobody queries it).
``build_threads``: ``add_items`` threads (None: ``num_threads``; ``callbacks.index_rebuild.
build_threads`` sets it where the build runs in a thread of the training process).
"""

from __future__ import annotations

import logging
from typing import Any

import hnswlib
import numpy as np

from hf_softmax.cores import threads_for
from hf_softmax.samplers.base import Sampler

log = logging.getLogger(__name__)
_NONE = np.empty(0, np.int64)  # no stale rows


class HNSWSampler(Sampler):
    name = "hnsw"
    dense = False
    needs_index = True
    effort_knob = "ef"  # the query beam
    # hnswlib reads a graph file whole under the GIL: a trainer never loads one mid-training
    # (``background: process`` refreshes in a thread instead, index_maintainer.mode)
    loads_with_gil = True
    worker_knobs = {"refresh_in_place": True}  # the worker's graph serves no queries

    def __init__(
        self,
        num_classes: int,
        num: int,
        metric: str = "ip",
        seed: int = 0,
        m: int = 16,
        ef_construction: int = 100,
        ef: int = 32,
        num_threads: int = -1,
        refresh_fraction: float = 0.1,
        refresh_in_place: bool = False,
        build_threads: int | None = None,
        **selection: Any,
    ) -> None:
        super().__init__(num_classes, num, metric, seed, **selection)
        self.m = int(m)
        self.ef_construction = int(ef_construction)
        self.ef = int(ef)
        self.num_threads = int(num_threads)
        self.refresh_fraction = float(refresh_fraction)
        self.refresh_in_place = bool(refresh_in_place)
        self.build_threads = None if build_threads is None else int(build_threads)
        self._warned_short = False
        # refresh without copies: the graph out of service and, per graph, the ids of the
        # rows it lacks (updated since it was last built or refreshed)
        self._spare: hnswlib.Index | None = None
        self._stale: dict[int, np.ndarray] = {}  # id(graph) -> sorted ids
        self._refreshed = False  # refresh() was called: keep a spare from now on

    def build_index(self, weights: np.ndarray) -> hnswlib.Index:
        """(N, D) float32 snapshot -> a new hnswlib.Index with labels 0..N-1."""
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        n, d = weights.shape
        if n != self.num_classes:
            raise ValueError(f"sampler 'hnsw': weights have {n} rows, expected {self.num_classes}")
        index = hnswlib.Index(space=self.metric, dim=d)
        index.init_index(
            max_elements=n, M=self.m, ef_construction=self.ef_construction, random_seed=self.seed
        )
        index.add_items(weights, np.arange(n, dtype=np.int64), num_threads=self._add_threads)
        index.set_ef(self.ef)
        return index

    @property
    def _add_threads(self) -> int:
        return threads_for(self.num_threads if self.build_threads is None else self.build_threads)

    def refresh(self, weights: np.ndarray, changed_ids: np.ndarray) -> hnswlib.Index:
        """Bring a graph up to date with ``weights``; returns the index to ``swap`` in.

        changed_ids: the rows updated since the previous rebuild. weights: the full (N, D)
        snapshot (in place: also just the changed rows, (len(changed_ids), D)). A refresh
        re-inserting more than ``refresh_fraction`` of the rows is a full build.
        """
        changed = np.unique(np.asarray(changed_ids, dtype=np.int64))
        weights = np.asarray(weights, dtype=np.float32)
        full = weights.shape[0] == self.num_classes
        if self.refresh_in_place:
            return self._refresh_serving(weights, changed, full)
        with self._lock:
            self._refreshed = True
            for graph in (self._index, self._spare):  # neither has these rows yet
                if graph is not None:
                    self._stale[id(graph)] = np.union1d(self._stale.get(id(graph), changed),
                                                        changed)  # fmt: skip
            spare = self._spare
            stale = None if spare is None else self._stale[id(spare)]
        if not full:
            raise ValueError(
                "sampler 'hnsw': a refresh of the spare graph needs the full "
                f"({self.num_classes}, D) snapshot, got {weights.shape[0]} rows"
            )
        if spare is None or stale.size > self.refresh_fraction * self.num_classes:
            with self._lock:  # about to be replaced: free it before building another
                self._spare = None
                self._stale.pop(id(spare), None)
            return self.build_index(weights)
        if stale.size:
            spare.add_items(np.ascontiguousarray(weights[stale]), stale,
                            num_threads=self._add_threads)  # fmt: skip
        spare.set_ef(self.ef)
        with self._lock:
            self._stale[id(spare)] = _NONE
        return spare

    def ready_for_refresh(self) -> None:
        """The spare graph, a copy of the serving one, made before the first step: a copy
        holds the GIL (0.2 s at 10^5 x 256), so no refresh makes one inside a step. Any older
        spare (an earlier run in this process) is dropped: its stale rows are not known."""
        with self._lock:
            if self.refresh_in_place or self._index is None:
                return
            self._refreshed = True
            self._spare = spare = hnswlib.Index(self._index)
            spare.set_ef(self.ef)
            self._stale = {id(self._index): _NONE, id(spare): _NONE}

    def _refresh_serving(self, weights: np.ndarray, changed: np.ndarray, full: bool) -> Any:
        """``refresh_in_place``: the serving graph itself, under the lock queries take."""
        current = self._index
        if current is None or changed.size > self.refresh_fraction * self.num_classes:
            return self.build_index(weights)
        if changed.size == 0:
            return current
        rows = np.ascontiguousarray(weights[changed] if full else weights)
        if rows.shape[0] != changed.size:
            raise ValueError(
                f"sampler 'hnsw': refresh got {rows.shape[0]} rows for {changed.size} changed ids"
            )
        with self._lock:
            current.add_items(rows, changed, num_threads=self._add_threads)
        return current

    def swap(self, index: Any, table: np.ndarray | None = None) -> None:
        """Install ``index``; once ``refresh`` is in use, the graph it replaces becomes the
        spare the next refresh updates (with the rows it lacks)."""
        with self._lock:
            old, stale = self._index, self._stale
            keep = self._refreshed and not self.refresh_in_place and old is not index
            self._spare = old if keep else None
            self._stale = {id(g): stale.get(id(g), _NONE) for g in (index, self._spare)
                           if g is not None}  # fmt: skip
        super().swap(index, table)

    def query(self, features: np.ndarray, k: int) -> np.ndarray:
        feats = np.ascontiguousarray(features, dtype=np.float32)
        k = min(k, self.num_classes)
        if self.refresh_in_place:
            with self._lock:
                return self._knn(self._index, feats, k)
        return self._knn(self._index, feats, k)

    def query_index(self, index: hnswlib.Index | None, features: np.ndarray, k: int) -> np.ndarray:
        """features (B, D) -> (B, k) nearest ids in ``index`` (-1 where too few were found)."""
        feats = np.ascontiguousarray(features, dtype=np.float32)
        return self._knn(index, feats, min(k, self.num_classes))

    def default_effort(self, k: int) -> int:
        return max(self.configured_effort, k)

    def _knn(self, index: hnswlib.Index | None, feats: np.ndarray, k: int) -> np.ndarray:
        if index is None:
            raise RuntimeError("sampler 'hnsw': query before the first build")
        if index.ef != self.ef:  # tuned since this index was built
            index.set_ef(self.ef)
        try:
            labels, _ = index.knn_query(feats, k=k, num_threads=threads_for(self.num_threads))
        except RuntimeError:
            # hnswlib refuses when some query finds fewer than k (ef / m too small); the
            # random fill covers the missing ids.
            if not self._warned_short:
                self._warned_short = True
                log.warning("sampler 'hnsw': fewer than k=%d neighbours found; raise ef", k)
            return np.full((feats.shape[0], k), -1, dtype=np.int64)
        return labels.astype(np.int64)
