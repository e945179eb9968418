"""Sampler interface: the index life cycle and the selection of one step's active set.

``select`` turns a batch (features (B, D), labels (B,)) into an ``ActiveSet`` of exactly
M = ``num`` ids (``samplers/active_set.py`` draws the parts): the unique positives; for index
samplers, ``M - |P|`` (less the ``random_fraction`` share) rank-major candidates from each
feature's k = ceil((M - |P|) / B) + 1 nearest rows, or (``query="label"``) from the
positives' rows of the class-neighbour table (``hf_softmax.class_table``), which needs no
features, so a step can be selected ahead; then uniform classes until there are M. Before
the first ``swap`` an index sampler selects like ``random`` and logs that once.

Thread model: ``build_index`` is pure (reads a snapshot, returns a new index object) and may
run in a background thread; ``swap`` installs an index atomically (one attribute store under
a lock); ``query`` reads the attribute once, so a swap never tears a query.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

import numpy as np
import torch

from hf_softmax.cell_table import cell_table
from hf_softmax.class_table import (
    TABLE_BATCH,
    batch_order,
    check_label_knobs,
    neighbour_table,
    table_candidates,
)
from hf_softmax.samplers.active_set import (
    ActiveSet,
    check_selection_knobs,
    logq_adjust,
    positives_of,
    rank_major_candidates,
    uniform_fill,
)
from hf_softmax.samplers.state import SamplerState
from hf_softmax.samplers.tuning import SamplerTuning

log = logging.getLogger(__name__)

METRICS = ("ip", "cosine")


class Sampler(SamplerTuning, SamplerState):
    """Base class; subclasses override ``build_index`` / ``query`` (index samplers) or ``select``.

    num_classes: N; num: M (active classes per step); metric: "ip" | "cosine" (must match the
    head); seed: seeds the torch generator used for the random fill; random_fraction,
    index_after, correction: the selection knobs (``active_set.check_selection_knobs``).
    query: "feature" (each feature's nearest rows, queried per step) or "label" (the
    positives' rows of the class-neighbour table, K = ``table_k`` per class, built with the
    index); feature_share (label mode): the share of the index's negatives that the first
    ceil(feature_share * B) samples query per feature, the table filling the rest;
    table_trees (label mode): 0 = the table from the index, T > 0 = from T projection trees.
    Subclasses take their own knobs and pass ``**selection`` on, so
    ``conf/sampler/<name>.yaml`` (``_partial_: true``) holds M, the selection knobs and the
    kind's knobs; N, the metric and the seed are given when the data is known.
    """

    name: str = "base"
    dense: bool = False
    needs_index: bool = False
    # selection knobs of every sampler (``check_selection_knobs``): the uniform share of the
    # negatives, selects at random before the index serves, the loss's sampling correction
    random_fraction: float = 0.0
    index_after: int = 0
    correction: str = "none"
    inline_build: bool = False  # builds cheap enough to run inside the step (background: auto)
    # a built index loads into the training process only under the GIL for long (hnswlib
    # reads a graph whole): ``background: process`` builds such an index in a thread instead
    loads_with_gil: bool = False
    # constructor knobs kept under another attribute name (``query`` is also a method)
    knob_attributes = {"query": "query_mode"}

    def __init__(
        self,
        num_classes: int,
        num: int,
        metric: str = "ip",
        seed: int = 0,
        random_fraction: float = 0.0,
        index_after: int = 0,
        correction: str = "none",
        query: str = "feature",
        table_k: int = 16,
        feature_share: float = 0.0,
        table_trees: int = 0,
    ) -> None:
        self.query_mode, self.table_k, self.feature_share, self.table_trees = check_label_knobs(
            self.name, query, table_k, feature_share, table_trees
        )
        if metric not in METRICS:
            raise ValueError(
                f"sampler {self.name!r}: metric must be one of {METRICS}, got {metric!r}"
            )
        if num_classes < 1:
            raise ValueError(f"sampler {self.name!r}: num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.metric = metric
        self.seed = int(seed)
        self.num = num
        self.generator = torch.Generator().manual_seed(self.seed)
        self._index: Any = None
        self._table: np.ndarray | None = None  # (N, K) int32, label mode
        self.last_positives = np.empty(0, dtype=np.int64)  # the last select's (label probe)
        self._lock = threading.Lock()
        self._warned_fallback = False
        self.last_k: int | None = None
        self.num_selects = self.num_fallbacks = self.num_swaps = 0
        # selection knobs (see the class attributes and ``active_set.check_selection_knobs``)
        self.random_fraction, self.index_after, self.correction = check_selection_knobs(
            self.name, random_fraction, index_after, correction
        )

    # -- M ---------------------------------------------------------------------------------
    @property
    def num(self) -> int:
        return self._num

    @num.setter
    def num(self, value: int) -> None:
        """M can change during training (``num_schedule``); it must stay in 1..N."""
        value = int(value)
        if not 1 <= value <= self.num_classes:
            raise ValueError(
                f"sampler {self.name!r}: num (M) = {value} must be in 1..num_classes "
                f"(N = {self.num_classes})"
            )
        self._num = value

    # -- index life cycle ------------------------------------------------------------------
    @property
    def index(self) -> Any:
        """The index serving queries now (None before the first swap)."""
        return self._index

    @property
    def has_index(self) -> bool:
        return self._index is not None

    def build_index(self, weights: np.ndarray) -> Any:
        """weights: (N, D) float32 snapshot -> a new index. Pure: never touches ``self.index``,
        and keeps no view of ``weights`` (a background build hands the snapshot's memory
        back to the kernel once the build is done)."""
        return None

    @property
    def table(self) -> np.ndarray | None:
        """The class-neighbour table (N, K) int32 serving label selection (None before)."""
        return self._table

    @property
    def selects_ahead(self) -> bool:
        """Selection needs only the labels (label mode, no feature share): a step can be
        selected ahead."""
        return self.needs_index and not self.queries_features

    @property
    def queries_features(self) -> bool:
        """A step queries the index with features (feature mode, or label mode with a
        ``feature_share``): the training process needs the index itself, not only the table."""
        return self.query_mode == "feature" or self.feature_share > 0

    @property
    def table_only(self) -> bool:
        """Label mode, the table from projection trees, no feature share: no step queries the
        index and the table needs none, so a build makes the table alone (``build``)."""
        return self.query_mode == "label" and self.table_trees > 0 and self.feature_share == 0

    def build(self, weights: np.ndarray) -> tuple[Any, np.ndarray | None]:
        """weights (N, D) snapshot -> (index, table): ``build_index`` then ``build_table``;
        ``table_only``: (None, the table), no index built."""
        index = None if self.table_only else self.build_index(weights)
        return index, self.build_table(index, weights)

    def build_table(self, index: Any, weights: np.ndarray) -> np.ndarray | None:
        """The (N, table_k) int32 class-neighbour table from a built ``index`` over
        ``weights`` (N, D); None in feature mode. Pure, like ``build_index``. With
        ``table_trees`` T > 0, from T random-projection trees' cells instead (``cell_table``),
        with or without an index."""
        if self.query_mode != "label" or (index is None and self.table_trees == 0):
            return None
        weights = np.asarray(weights)
        if self.table_trees > 0:
            return cell_table(weights, self.table_k, self.table_trees, self.seed, self.metric)

        def rows(ids: np.ndarray, k: int) -> np.ndarray:
            return self.query_rows(index, weights, ids, k)

        return neighbour_table(rows, weights.shape[0], self.table_k, self.table_batch)

    table_batch = TABLE_BATCH  # rows queried per call while building the table

    def query_rows(self, index: Any, weights: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
        """The k nearest rows of ``index`` (built over ``weights`` (N, D)) to its own rows
        ``ids`` (b,) -> (b, k) int64, -1 padded. By vector here; a backend that can query by
        item id overrides it."""
        return self.query_index(index, np.ascontiguousarray(weights[ids], np.float32), k)

    def query_index(self, index: Any, features: np.ndarray, k: int) -> np.ndarray:
        """``query`` against a given ``index`` (not necessarily the serving one)."""
        raise NotImplementedError(f"sampler {self.name!r} has no index to query")

    def swap(self, index: Any, table: np.ndarray | None = None) -> None:
        """Install a built index (and its table) atomically; the old ones are dropped once no
        query holds them."""
        with self._lock:
            self._index = index
            self._table = table
            self.num_swaps += 1

    def refresh(self, weights: np.ndarray, changed_ids: np.ndarray) -> Any | None:
        """Incremental update of only ``changed_ids``; None: unsupported (rebuild instead)."""

    def ready_for_refresh(self) -> None:
        """After the first build, before the first step: what ``refresh`` in this process
        needs made while no step runs (hnsw: its spare graph). Nothing by default."""

    def query(self, features: np.ndarray, k: int) -> np.ndarray:
        """features (B, D) float32 -> (B, k) int64 class ids, nearest first, -1 where missing."""
        raise NotImplementedError(f"sampler {self.name!r} has no index to query")

    # -- selection -------------------------------------------------------------------------
    def select(self, features: torch.Tensor, labels: torch.Tensor) -> ActiveSet:
        """features (B, D) (detached, any device), labels (B,) int64 -> ActiveSet on CPU."""
        positives, targets = positives_of(labels, self.num, self.num_classes, self.name)
        num_pos, m = int(positives.numel()), self.num
        use_index = self.needs_index and self.num_selects >= self.index_after
        self.num_selects += 1
        pos = positives.numpy()
        chosen = pos
        negatives = m - num_pos
        from_index = negatives - int(round(self.random_fraction * negatives))
        self.last_positives = pos
        if from_index > 0 and use_index:
            if self.query_mode == "label" and self.feature_share > 0 and features is not None:
                index_ids = self._mixed_neighbours(features, labels, pos, from_index)
            elif self.query_mode == "label":
                index_ids = self._table_neighbours(batch_order(labels), pos, from_index)
            else:
                index_ids = self._neighbours(features, pos, from_index)
            chosen = np.concatenate([pos, index_ids])
        fill = uniform_fill(self.num_classes, chosen, m - chosen.size, self.generator)
        ids = torch.from_numpy(np.concatenate([chosen, fill]).astype(np.int64, copy=False))
        adjust = None
        if self.correction == "logq" and fill.size:
            adjust = logq_adjust(self.num_classes, chosen.size, fill.size)
        return ActiveSet(ids, targets, num_pos, int(chosen.size - num_pos), adjust)

    def _fallback(self) -> np.ndarray:
        self.num_fallbacks += 1
        if not self._warned_fallback:
            self._warned_fallback = True
            log.info("sampler %r: no index built yet, selecting random classes until the "
                     "first build", self.name)  # fmt: skip
        return np.empty(0, dtype=np.int64)

    def _table_neighbours(self, order: np.ndarray, pos: np.ndarray, want: int) -> np.ndarray:
        """Label mode: up to ``want`` ids of the table rows of the positives ``order`` (in
        batch order), rank-major, deduped, none of ``pos`` (the positives, any order, and
        any ids already taken)."""
        table = self._table  # read once: a swap cannot tear it
        if table is None:
            return self._fallback()
        return table_candidates(table, order, want, pos)

    def _mixed_neighbours(
        self, features: torch.Tensor, labels: torch.Tensor, pos: np.ndarray, want: int
    ) -> np.ndarray:
        """Label mode with a feature share s: round(s * want) ids from the per-feature query
        of the first ceil(s * B) samples (rank-major), then the table rows of the positives
        (batch order, rank-major), each id once, no positive, up to ``want`` in all."""
        share = self.feature_share
        queried = features[: max(1, math.ceil(share * features.shape[0]))]
        want_f = int(round(share * want))
        by_feature = self._neighbours(queried, pos, want_f) if want_f else pos[:0]
        taken = np.concatenate([pos, by_feature])
        by_table = self._table_neighbours(batch_order(labels), taken, want - by_feature.size)
        return np.concatenate([by_feature, by_table])

    def _neighbours(self, features: torch.Tensor, pos: np.ndarray, want: int) -> np.ndarray:
        """Up to ``want`` neighbour ids of the batch, not in ``pos``, rank-major order."""
        if not self.has_index:
            return self._fallback()
        feats = features.detach().to("cpu", torch.float32).numpy()
        batch = max(feats.shape[0], 1)
        k = min(math.ceil(want / batch) + 1, self.num_classes)
        self.last_k = k  # the k a step really uses (recall probes measure at it)
        nbrs = self.query(np.ascontiguousarray(feats), k)  # (B, k)
        return rank_major_candidates(nbrs, pos, want)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_classes={self.num_classes}, num={self.num}, "
                f"metric={self.metric!r}, has_index={self.has_index})")  # fmt: skip
