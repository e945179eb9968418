"""The knobs of index upkeep (``callbacks.index_rebuild`` in the config) and its records.

``RebuildSettings`` validates the knobs once, before any work starts; ``RebuildRecord`` is
one finished (or failed) rebuild, kept by ``IndexMaintainer.history``.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKGROUND_MODES = ("auto", "thread", "process")
WORKER_MEMORY = ("keep", "release")
_KEY = "callbacks.index_rebuild"


@dataclass
class RebuildRecord:
    """One finished (or failed) rebuild: steps at start and at swap, build seconds, rows
    updated since the previous rebuild (what a refresh re-inserts)."""

    start_step: int
    swap_step: int
    seconds: float
    kind: str  # "build" | "refresh"
    background: bool
    ok: bool = True
    changed: int = 0


@dataclass
class RebuildSettings:
    """interval: global steps between scheduled rebuilds (>= 1).
    background: False (build inside the step), True / "thread" (a thread of this process),
    "process" (a build worker process, ``hf_softmax.build_worker``), "auto" (inline for
    samplers whose ``inline_build`` is true, e.g. exact; a process for large indexes,
    ``index_build.auto_background``; a thread otherwise).
    probe_every: steps between recall probes (0 = never); probe_k: k of recall@k (None:
    the k the step used). min_recall / adaptive: rebuild early when the probe falls below.
    target_recall: keep recall@k there (``hf_softmax.recall_target``). refresh: allow the
    incremental refresh of samplers that have one (hnsw). build_threads: threads of a
    background build (None: in a worker process, the cores torch's threads leave free, at
    least one (``index_build.worker_threads``); in a thread, the sampler's own knob, e.g.
    annoy ``n_jobs``). worker_memory: ``keep`` (the build worker's allocator keeps the
    memory a build freed for the next one, ``worker_process.memory_env``) or ``release``
    (back to the system after each build).
    """

    interval: int = 20
    background: bool | str = "auto"
    probe_every: int = 50
    probe_k: int | None = None
    min_recall: float | None = None
    adaptive: bool = False
    target_recall: float | None = None
    refresh: bool = True
    exact_chunk_size: int = 65536
    build_threads: int | None = None
    worker_memory: str = "keep"

    def __post_init__(self) -> None:
        if int(self.interval) < 1:
            raise ValueError(f"{_KEY}.interval must be >= 1, got {self.interval}")
        if int(self.probe_every) < 0:
            raise ValueError(f"{_KEY}.probe_every must be >= 0, got {self.probe_every}")
        if self.probe_k is not None and int(self.probe_k) < 1:
            raise ValueError(f"{_KEY}.probe_k must be >= 1 or null, got {self.probe_k}")
        if self.adaptive and (int(self.probe_every) == 0 or self.min_recall is None):
            raise ValueError(
                f"{_KEY}: adaptive rebuilds need probe_every >= 1 and min_recall set (got "
                f"probe_every={self.probe_every}, min_recall={self.min_recall})"
            )
        if self.target_recall is not None and int(self.probe_every) <= 0:
            raise ValueError(
                f"{_KEY}.target_recall needs probe_every >= 1 (the probe measures the recall "
                "it steers)"
            )
        if isinstance(self.background, str):
            if self.background not in BACKGROUND_MODES:
                raise ValueError(
                    f"{_KEY}.background must be true, false or one of {BACKGROUND_MODES}, got "
                    f"{self.background!r}"
                )
        else:
            self.background = bool(self.background)
        if self.build_threads is not None and int(self.build_threads) < 1:
            raise ValueError(f"{_KEY}.build_threads must be >= 1 or null, got {self.build_threads}")
        if self.worker_memory not in WORKER_MEMORY:
            raise ValueError(f"{_KEY}.worker_memory must be one of {WORKER_MEMORY}, got "
                             f"{self.worker_memory!r}")  # fmt: skip
        self.interval = int(self.interval)
        self.probe_every = int(self.probe_every)
        self.probe_k = None if self.probe_k is None else int(self.probe_k)
        self.adaptive = bool(self.adaptive)
        self.refresh = bool(self.refresh)
        self.exact_chunk_size = int(self.exact_chunk_size)
        self.build_threads = None if self.build_threads is None else int(self.build_threads)
