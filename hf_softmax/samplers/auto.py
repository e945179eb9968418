"""``auto`` (the default): exact top-k where it costs less than an index query, Annoy beyond.

An exact chunked top-k over all rows costs O(B * N * D) per step and has perfect recall; a
hashing-forest query costs O(B * search_k * D) but needs builds and loses recall. Below
``exact_max_elements`` rows x dims (N * D; 8M = e.g. 62K classes at D = 128 or 31K at
D = 256, where a step's exact top-k over B = 128 features is ~1 GMAC, a few ms on a GPU and
about the cost of the query on 2 CPU cores, measured in docs/benchmarks.md) it uses
``exact``; above, ``annoy`` (the paper's hashing forest) with its knobs. The choice is made
once, at the first build (when D is known), and logged with the reason.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from hf_softmax.samplers.annoy import AnnoySampler
from hf_softmax.samplers.base import Sampler
from hf_softmax.samplers.exact import ExactSampler

log = logging.getLogger(__name__)


class AutoSampler(Sampler):
    name = "auto"
    dense = False
    needs_index = True

    def __init__(
        self,
        num_classes: int,
        num: int,
        metric: str = "ip",
        seed: int = 0,
        exact_max_elements: int = 8_000_000,
        chunk_size: int = 65536,
        ntrees: int = 10,
        search_k: int = -1,
        n_jobs: int = -1,
        query_threads: int = -1,
        **selection: Any,
    ) -> None:
        super().__init__(num_classes, num, metric, seed, **selection)
        self.exact_max_elements = int(exact_max_elements)
        mode = {"query": self.query_mode, "table_k": self.table_k,
                "feature_share": self.feature_share}  # the backend builds tables  # fmt: skip
        self.backends: dict[str, Sampler] = {
            "exact": ExactSampler(num_classes, num, metric, seed, chunk_size, **mode),
            "annoy": AnnoySampler(
                num_classes, num, metric, seed, ntrees, search_k, n_jobs, query_threads, **mode
            ),
        }
        self.backend: Sampler | None = None  # chosen at the first build

    def choose(self, num_classes: int, dim: int) -> Sampler:
        """The backend for N x D rows (once; later calls return the first choice)."""
        if self.backend is None:
            elements = num_classes * dim
            kind = "exact" if elements <= self.exact_max_elements else "annoy"
            self.backend = self.backends[kind]
            log.info(
                "sampler 'auto': %s (N x D = %d x %d = %.3g %s exact_max_elements = %.3g)",
                kind, num_classes, dim, elements, "<=" if kind == "exact" else ">",
                self.exact_max_elements,
            )  # fmt: skip
        return self.backend

    @property
    def inline_build(self) -> bool:  # the backend's (exact: inline; annoy: background)
        return self.backend is not None and self.backend.inline_build

    @property
    def kind(self) -> str | None:
        """The chosen backend's name (None before the first build)."""
        return None if self.backend is None else self.backend.name

    def build_index(self, weights: np.ndarray) -> Any:
        n, d = np.shape(weights)
        return self.choose(n, d).build_index(weights)

    def query(self, features: np.ndarray, k: int) -> np.ndarray:
        return self.query_index(self._index, features, k)

    def query_index(self, index: Any, features: np.ndarray, k: int) -> np.ndarray:
        if self.backend is None:
            raise RuntimeError("sampler 'auto': query before the first build")
        return self.backend.query_index(index, features, k)

    @property
    def table_batch(self) -> int:
        return super().table_batch if self.backend is None else self.backend.table_batch

    def query_rows(self, index: Any, weights: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
        if self.backend is None:
            raise RuntimeError("sampler 'auto': table query before the first build")
        return self.backend.query_rows(index, weights, ids, k)

    # target_recall tunes the backend's query effort; exact has none (always perfect)
    @property
    def effort(self) -> int | None:
        return None if self.backend is None else self.backend.effort

    @effort.setter
    def effort(self, value: int) -> None:
        if self.backend is not None:
            self.backend.effort = value

    def default_effort(self, k: int) -> int | None:
        return None if self.backend is None else self.backend.default_effort(k)
