"""``annoy``: the hashing forest (Spotify Annoy, random-projection trees).

Knobs: ``ntrees`` (more trees: better recall, slower and bigger build), ``search_k`` (nodes
inspected per query, -1 = ntrees * k; more: better recall, slower query), ``n_jobs`` (build
threads, -1 = all cores), ``query_threads`` (threads sharing a batch's queries, -1 = all
cores). Metric: "ip" -> Annoy ``dot``; "cosine" -> ``angular``.

Cost: build O(ntrees * N log N * D), ~45 s for 10 trees over 10^6 x 256 on 2 cores; query
per sample O(search_k * D) in C++ (``get_nns_by_vector``, which releases the GIL, so the
batch is split over ``query_threads`` threads). The label-mode table asks for each row's
neighbours by item id (``get_nns_by_item``: no list conversion, GIL released) over ``n_jobs``
threads, the build's own. Rows are added in chunks so that a
background build never holds the GIL for long (a training step in the main thread would
wait on it), into a file, not memory (``build_dir``, ``build_files.BuildFiles``: sizing
the nodes in memory holds the GIL for seconds at 10^6 x 256).
Annoy indexes are immutable after ``build``: every rebuild builds a new object from a
snapshot, so the serving index is never mutated (no lock on the query path).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from annoy import AnnoyIndex

from hf_softmax.cores import threads_for
from hf_softmax.samplers.base import Sampler
from hf_softmax.samplers.build_files import MEMORY, BuildFiles, annoy_bytes

ANNOY_METRIC = {"ip": "dot", "cosine": "angular"}
# rows per tolist(); the GIL is handed over after each chunk (build_index). A training step
# gives the GIL up at every torch op (hundreds per step) and waits up to one chunk to get it
# back: 64 rows made a step beside the build 8.7x the median at 10^5 x 256, 8 rows 2.2x
# (9.2x -> 3.8x side by side on a slower VM; the rows go in slower beside training: that
# build took 4.1 s, not 2.5 s; docs/bench/selection_notes.md)
_ADD_CHUNK = 8
_POOLS: dict[int, ThreadPoolExecutor] = {}  # shared query pools, by size (never pickled)


_TABLE_POOLS: dict[int, ThreadPoolExecutor] = {}  # table builds: never queue behind a step


def _pool(threads: int, pools: dict[int, ThreadPoolExecutor] = _POOLS) -> ThreadPoolExecutor:
    if threads not in pools:
        name = "annoy-table" if pools is _TABLE_POOLS else "annoy-query"
        pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix=name)
    return pools[threads]


class AnnoySampler(Sampler):
    name = "annoy"
    dense = False
    needs_index = True
    effort_knob = "search_k"  # nodes inspected per query
    # the worker saves its index to the file the trainer maps; annoy's save of an index
    # built on disk writes nothing, so there it builds in memory (no step to stall)
    worker_knobs = {"build_dir": MEMORY}

    def __init__(
        self,
        num_classes: int,
        num: int,
        metric: str = "ip",
        seed: int = 0,
        ntrees: int = 10,
        search_k: int = -1,
        n_jobs: int = -1,
        query_threads: int = -1,
        build_dir: str | None = None,
        **selection: Any,
    ) -> None:
        super().__init__(num_classes, num, metric, seed, **selection)
        self.ntrees = int(ntrees)
        self.search_k = int(search_k)
        self.n_jobs = int(n_jobs)
        self.query_threads = threads_for(query_threads)
        self.build_dir = build_dir
        self._files = BuildFiles(build_dir)

    def build_index(self, weights: np.ndarray) -> AnnoyIndex:
        """(N, D) float32 snapshot -> a built AnnoyIndex (items 0..N-1)."""
        weights = np.asarray(weights, dtype=np.float32)
        n, d = weights.shape
        if n != self.num_classes:
            raise ValueError(f"sampler 'annoy': weights have {n} rows, expected {self.num_classes}")
        index = AnnoyIndex(d, ANNOY_METRIC[self.metric])
        index.set_seed(self.seed)
        path = self._files.next_path(annoy_bytes(n, d, self.ntrees), serving=self._index)
        if path is not None:
            index.on_disk_build(path)  # the node file grows sparse: no GIL-held memset
        add = index.add_item
        # The highest id first: Annoy sizes its node buffer once, instead of growing (and
        # copying) it under the GIL as ids climb (a ~0.3 s stall at 10^5 x 256 in memory).
        add(n - 1, weights[n - 1].tolist())
        for start in range(0, n, _ADD_CHUNK):
            # lists convert faster than numpy rows; add_item holds the GIL, so after each
            # chunk a training thread waiting for it gets it (sleep(0) releases it): one that
            # waited for the switch interval at every torch op stalled a step for the whole
            # loop (1.8 s at 10^5 x 256 in a build thread; _ADD_CHUNK)
            for i, row in enumerate(weights[start : start + _ADD_CHUNK].tolist(), start):
                add(i, row)
            time.sleep(0)
        index.build(self.ntrees, n_jobs=threads_for(self.n_jobs))  # annoy's -1: every host core
        self._files.built(index, path)
        return index

    def swap(self, index: Any, table: np.ndarray | None = None) -> None:
        """As ``Sampler.swap``; the index taken out of service is dropped in a thread of its
        own (``BuildFiles.retire``), not in the step that swapped (78 ms at 10^6 x 256)."""
        old = self._index
        super().swap(index, table)
        if old is not None and old is not index:
            self._files.retire(old)

    def query(self, features: np.ndarray, k: int) -> np.ndarray:
        return self.query_index(self._index, features, k)  # read once: a swap cannot tear it

    def default_effort(self, k: int) -> int:
        return self.ntrees * k  # what Annoy uses for search_k = -1

    def query_index(self, index: AnnoyIndex | None, features: np.ndarray, k: int) -> np.ndarray:
        """features (B, D) -> (B, k) nearest ids in ``index`` (-1 padded)."""
        if index is None:
            raise RuntimeError("sampler 'annoy': query before the first build")
        get = index.get_nns_by_vector
        feats = np.asarray(features, np.float32).tolist()
        search_k = self.search_k

        def run(part: list[list[float]]) -> list[list[int]]:
            return [get(f, k, search_k) for f in part]

        threads = min(self.query_threads, max(1, len(feats) // 16))
        if threads == 1:
            return pad_ids(run(feats), k)
        step = -(-len(feats) // threads)
        parts = [feats[i : i + step] for i in range(0, len(feats), step)]
        futures = [_pool(threads).submit(run, part) for part in parts[1:]]
        rows = run(parts[0])  # this thread takes a share too
        for future in futures:
            rows += future.result()
        return pad_ids(rows, k)

    def query_rows(
        self, index: AnnoyIndex | None, weights: np.ndarray, ids: np.ndarray, k: int
    ) -> np.ndarray:
        """The k nearest items of ``index`` to its own items ``ids`` (b,) -> (b, k), -1
        padded; ``n_jobs`` threads share them (the table build's cores)."""
        if index is None:
            raise RuntimeError("sampler 'annoy': table query before the first build")
        get = index.get_nns_by_item
        items = [int(i) for i in ids]
        search_k = self.search_k

        def run(part: list[int]) -> list[list[int]]:
            return [get(i, k, search_k) for i in part]

        cores = threads_for(self.n_jobs)
        threads = min(cores, max(1, len(items) // 64))
        if threads == 1:
            return pad_ids(run(items), k)
        step = -(-len(items) // threads)
        parts = [items[i : i + step] for i in range(0, len(items), step)]
        futures = [_pool(threads, _TABLE_POOLS).submit(run, part) for part in parts[1:]]
        rows = run(parts[0])
        for future in futures:
            rows += future.result()
        return pad_ids(rows, k)


def pad_ids(rows: list[list[int]], k: int) -> np.ndarray:
    """Ragged neighbour lists -> (B, k) int64 padded with -1."""
    out = np.full((len(rows), k), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        r = r[:k]
        out[i, : len(r)] = r
    return out
