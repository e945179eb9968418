"""``auto`` (the default): exact top-k where it costs less than an index query, an index beyond.

An exact chunked top-k over all rows costs O(B * N * D) per step and has perfect recall; a
hashing-forest query costs O(B * search_k * D) but needs builds and loses recall. Below
``exact_max_elements`` rows x dims (N * D; 8M = e.g. 62K classes at D = 128 or 31K at
D = 256, where a step's exact top-k over B = 128 features is ~1 GMAC, a few ms on a GPU and
about the cost of the query on 2 CPU cores, measured in docs/benchmarks.md) it uses
``exact``. Above, it uses the first of ``candidates`` (``annoy``, the paper's hashing forest,
with its knobs) unless ``callbacks.index_rebuild.target_recall`` is set: then it races the
candidates (``annoy``; ``faiss`` with the knobs under ``faiss:``, where faiss imports) on the
first snapshot and keeps the one that reaches the target recall for the least query time
(``samplers/race.py``), at the effort it needed; the race's index is the first build when
the winner was the last candidate built. The choice is made once, before the first
build (``prepare``), logged with the reason, and kept in the checkpoint, so a resumed run
builds the same backend; under DDP every rank ``adopt``s rank 0's
(``index_build.prepare_first_build``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from hf_softmax.samplers.annoy import AnnoySampler
from hf_softmax.samplers.base import Sampler
from hf_softmax.samplers.exact import ExactSampler
from hf_softmax.samplers.race import RaceEntry, race

CANDIDATES = ("annoy", "faiss")

log = logging.getLogger(__name__)


# at large N without a target recall, the first candidate serves at its default effort: say
# what that means and how to race (annoy at 10^6 x 256 finds ~5% of a feature's exact top-4)
_NO_TARGET = (
    "; no callbacks.index_rebuild.target_recall, so no race: it serves at its default "
    "query effort, whatever recall that gives; set target_recall to race the "
    "candidates for it"
)


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
        candidates: Any = CANDIDATES,
        race_queries: int = 256,
        faiss: dict[str, Any] | None = None,
        **selection: Any,
    ) -> None:
        super().__init__(num_classes, num, metric, seed, **selection)
        self.exact_max_elements = int(exact_max_elements)
        self.candidates = tuple(str(c) for c in candidates)
        if not self.candidates or set(self.candidates) - set(CANDIDATES):
            raise ValueError(f"sampler 'auto': candidates must be a non-empty list of "
                             f"{CANDIDATES}, got {list(self.candidates)}")  # fmt: skip
        self.race_queries = int(race_queries)
        self.faiss = dict(faiss or {})
        from hf_softmax.samplers.faiss import FAISS_KNOBS  # faiss itself is imported on use

        if set(self.faiss) - set(FAISS_KNOBS):
            raise ValueError(f"sampler 'auto': unknown faiss knob(s) "
                             f"{sorted(set(self.faiss) - set(FAISS_KNOBS))}; expected some "
                             f"of {list(FAISS_KNOBS)} (conf/sampler/faiss.yaml)")  # fmt: skip
        mode = {"query": self.query_mode, "table_k": self.table_k,
                "feature_share": self.feature_share,
                "table_trees": self.table_trees}  # the backend builds tables  # fmt: skip
        self.backends: dict[str, Sampler] = {
            "exact": ExactSampler(num_classes, num, metric, seed, chunk_size, **mode),
            "annoy": AnnoySampler(
                num_classes, num, metric, seed, ntrees, search_k, n_jobs, query_threads, **mode
            ),
        }
        self._mode = mode
        self.backend: Sampler | None = None  # chosen before the first build
        self.race_entries: list[RaceEntry] = []  # the race's results (empty: no race)

    def candidate(self, name: str) -> Sampler:
        """The backend ``name`` ("exact", "annoy", "faiss"; faiss made on first use)."""
        if name == "faiss" and name not in self.backends:
            from hf_softmax.samplers.faiss import FaissSampler  # ImportError says what to install

            self.backends[name] = FaissSampler(self.num_classes, self.num, self.metric,
                                               self.seed, **self.faiss, **self._mode)  # fmt: skip
        return self.backends[name]

    def choose(self, num_classes: int, dim: int, name: str | None = None, why: str = "") -> Sampler:
        """The backend for N x D rows (once; later calls return the first choice): exact up
        to ``exact_max_elements``, else ``name`` (default: the first candidate)."""
        if self.backend is None:
            elements = num_classes * dim
            small = elements <= self.exact_max_elements
            kind = "exact" if small else (name or self.candidates[0])
            self.backend = self.candidate(kind)
            log.info("sampler 'auto': %s (N x D = %d x %d = %.3g %s exact_max_elements = %.3g%s)",
                     kind, num_classes, dim, elements, "<=" if small else ">",
                     self.exact_max_elements, why)  # fmt: skip
        return self.backend

    def prepare(self, shape: Any, weights: Any, target_recall: float | None = None) -> Any:
        """Choose the backend before the first build; race the candidates when a target
        recall is set (see the module docstring) and return (winner's index, snapshot)."""
        n, d = (int(x) for x in shape)
        if self.backend is not None:
            return None
        raceable = len(self.candidates) > 1 and n * d > self.exact_max_elements
        if target_recall is None or not raceable:
            self.choose(n, d, why=_NO_TARGET if raceable else "")
            return None
        found = []
        for name in self.candidates:
            try:
                found.append((name, self.candidate(name)))
            except ImportError as e:
                log.warning("sampler 'auto': %s left out of the race (%s)", name, e)
        if len(found) < 2:
            self.choose(n, d, found[0][0], "; the only candidate that imports")
            return None
        snapshot = weights()
        k = self.table_k if self.query_mode == "label" else 10
        chunk = self.backends["exact"].chunk_size
        winner, index, self.race_entries = race(dict(found), snapshot, float(target_recall), k,
                                                self.race_queries, self.seed, chunk)  # fmt: skip
        summary = ", ".join(f"{e.name} {e.recall:.3f} at {e.query_ms:.3f} ms/query"
                            for e in self.race_entries)  # fmt: skip
        self.choose(n, d, winner, f"; race for recall@{k} >= {target_recall}: {summary}")
        return None if index is None else (index, snapshot)  # the last built, if it won

    def adopt(self, choice: dict[str, Any]) -> None:
        log.info("sampler 'auto': %s as rank 0 chose (this rank chose %s)", choice, self.choice)
        self._take(choice)

    @property
    def builder(self) -> Sampler:
        if self.backend is None:
            raise RuntimeError("sampler 'auto': no backend chosen yet (prepare runs first)")
        return self.backend

    # the choice (and its effort) survives a resume: the same backend is built again
    @property
    def choice(self) -> dict[str, Any] | None:
        if self.backend is None:
            return None
        return {"backend": self.backend.name, "effort": self.backend.effort}

    @choice.setter
    def choice(self, value: dict[str, Any] | None) -> None:
        if not value or self.backend is not None:
            return
        self._take(value)
        log.info("sampler 'auto': %s (%s = %s), as in the checkpoint", self.backend.name,
                 self.backend.effort_knob, value.get("effort"))  # fmt: skip

    def _take(self, value: dict[str, Any]) -> None:
        """Serve ``value``'s backend at its effort (a checkpoint's or rank 0's choice)."""
        self.backend = self.candidate(str(value["backend"]))
        if value.get("effort") is not None:
            self.backend.effort = int(value["effort"])

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

    @property
    def effort_limit(self) -> int:
        return super().effort_limit if self.backend is None else self.backend.effort_limit
