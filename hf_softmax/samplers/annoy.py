"""``annoy``: the hashing forest (Spotify Annoy, random-projection trees).

Knobs: ``ntrees`` (more trees: better recall, slower and bigger build), ``search_k`` (nodes
inspected per query, -1 = ntrees * k; more: better recall, slower query), ``n_jobs`` (build
threads, -1 = all cores). Metric: "ip" -> Annoy ``dot``; "cosine" -> ``angular``.

Cost: build O(ntrees * N log N * D), ~45 s for 10 trees over 10^6 x 256 on 2 cores; query
per sample O(search_k * D) in C++, one Python call per sample (``get_nns_by_vector``).
Annoy indexes are immutable after ``build``: every rebuild builds a new object from a
snapshot, so the serving index is never mutated (no lock on the query path).
"""

from __future__ import annotations

import numpy as np
from annoy import AnnoyIndex

from hf_softmax.samplers.base import Sampler, pad_ids

_ANNOY_METRIC = {"ip": "dot", "cosine": "angular"}


class AnnoySampler(Sampler):
    name = "annoy"
    dense = False
    needs_index = True

    def __init__(
        self,
        num_classes: int,
        num: int,
        metric: str = "ip",
        seed: int = 0,
        ntrees: int = 10,
        search_k: int = -1,
        n_jobs: int = -1,
    ) -> None:
        super().__init__(num_classes, num, metric, seed)
        self.ntrees = int(ntrees)
        self.search_k = int(search_k)
        self.n_jobs = int(n_jobs)

    def build_index(self, weights: np.ndarray) -> AnnoyIndex:
        """(N, D) float32 snapshot -> a built AnnoyIndex (items 0..N-1)."""
        weights = np.asarray(weights, dtype=np.float32)
        n, d = weights.shape
        if n != self.num_classes:
            raise ValueError(f"sampler 'annoy': weights have {n} rows, expected {self.num_classes}")
        index = AnnoyIndex(d, _ANNOY_METRIC[self.metric])
        index.set_seed(self.seed)
        add = index.add_item
        for i, row in enumerate(weights.tolist()):  # lists convert faster than numpy rows
            add(i, row)
        index.build(self.ntrees, n_jobs=self.n_jobs)
        return index

    def query(self, features: np.ndarray, k: int) -> np.ndarray:
        index = self._index  # read once: a concurrent swap cannot tear this query
        if index is None:
            raise RuntimeError("sampler 'annoy': query before the first build")
        get = index.get_nns_by_vector
        rows = [get(f, k, self.search_k) for f in np.asarray(features, np.float32).tolist()]
        return pad_ids(rows, k)
