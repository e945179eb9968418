"""``hnsw``: hierarchical navigable small-world graph (hnswlib).

Knobs: ``m`` (graph degree; memory and build cost grow with it), ``ef_construction`` (build
beam), ``ef`` (query beam; raise for recall), ``num_threads`` (build and query threads,
-1 = all cores), ``refresh_fraction`` (a refresh touching more than this fraction of the rows
does a full build instead), ``refresh_in_place`` (see below).
Metric: "ip" -> hnswlib ``ip``; "cosine" -> ``cosine`` (hnswlib normalises rows and queries).

Cost: full build O(N log N * m * D), ~380 s for 10^6 x 256 with m=16, ef_construction=100 on
2 cores; query batched in C++ over the whole batch (``knn_query`` with num_threads).

Refresh trade-off. hnswlib ``add_items`` with an existing label replaces that vector and
repairs its links, so only the rows updated since the last build need work. But it mutates
the graph while a concurrent ``knn_query`` may be walking it. Default (``refresh_in_place:
false``): ``refresh`` copies the serving index (``hnswlib.Index(index)``, a memcpy of
vectors + links, ~N*(4D + 8m) bytes) and updates the copy; the caller ``swap``s it in, so
queries never wait, at the price of a second index in memory during the refresh.
``refresh_in_place: true`` updates the serving index under the sampler lock, which every
query also takes: no extra memory, but queries block while the refresh runs.
"""

from __future__ import annotations

import logging
from typing import Any

import hnswlib
import numpy as np

from hf_softmax.samplers.base import Sampler

log = logging.getLogger(__name__)


class HNSWSampler(Sampler):
    name = "hnsw"
    dense = False
    needs_index = True
    effort_knob = "ef"  # the query beam

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
        refresh_fraction: float = 0.3,
        refresh_in_place: bool = False,
        **selection: Any,
    ) -> None:
        super().__init__(num_classes, num, metric, seed, **selection)
        self.m = int(m)
        self.ef_construction = int(ef_construction)
        self.ef = int(ef)
        self.num_threads = int(num_threads)
        self.refresh_fraction = float(refresh_fraction)
        self.refresh_in_place = bool(refresh_in_place)
        self._warned_short = False

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
        index.add_items(weights, np.arange(n, dtype=np.int64), num_threads=self.num_threads)
        index.set_ef(self.ef)
        return index

    def refresh(self, weights: np.ndarray, changed_ids: np.ndarray) -> hnswlib.Index:
        """Re-insert only ``changed_ids``; returns the index to ``swap`` in.

        weights: the full (N, D) snapshot or just the changed rows (len(changed_ids), D).
        Without a current index, or when more than ``refresh_fraction`` of the rows changed,
        this is a full build (then ``weights`` must be the full snapshot).
        """
        changed = np.unique(np.asarray(changed_ids, dtype=np.int64))
        weights = np.asarray(weights, dtype=np.float32)
        full = weights.shape[0] == self.num_classes
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
        if self.refresh_in_place:
            with self._lock:
                current.add_items(rows, changed, num_threads=self.num_threads)
            return current
        fresh = hnswlib.Index(current)  # deep copy; the serving index is not touched
        fresh.add_items(rows, changed, num_threads=self.num_threads)
        fresh.set_ef(self.ef)
        return fresh

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
            labels, _ = index.knn_query(feats, k=k, num_threads=self.num_threads)
        except RuntimeError:
            # hnswlib refuses when some query finds fewer than k (ef / m too small); the
            # random fill covers the missing ids.
            if not self._warned_short:
                self._warned_short = True
                log.warning("sampler 'hnsw': fewer than k=%d neighbours found; raise ef", k)
            return np.full((feats.shape[0], k), -1, dtype=np.int64)
        return labels.astype(np.int64)
