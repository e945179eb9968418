"""One index rebuild: the record of a build in flight and the build in this process.

A build also makes the sampler's class-neighbour table (label mode) from the fresh index.

``IndexMaintainer`` runs ``run_build`` inline or in a thread; ``build_worker.BuildWorker``
fills the same ``BuildJob`` from a worker process.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class BuildJob:
    """One rebuild in flight; ``done`` is set once ``index`` (or ``error``) is there."""

    start_step: int
    kind: str  # asked: "build" | "refresh"
    background: bool
    changed: int = 0  # rows updated since the previous rebuild
    done: threading.Event = field(default_factory=threading.Event)
    index: Any = None
    table: np.ndarray | None = None  # label mode: the class-neighbour table of ``index``
    kind_done: str = ""  # what ran (a refresh the sampler declines is a build)
    seconds: float = 0.0
    error: BaseException | None = None
    trace: str = ""

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Around the work that fills this job: an exception becomes ``error`` (+ ``trace``)
        for the training thread to report; ``seconds`` and ``done`` are set either way."""
        t0 = time.perf_counter()
        try:
            yield
        except BaseException as e:  # noqa: BLE001 - reported to the training thread
            self.error = e
            self.trace = traceback.format_exc()
        finally:
            self.seconds = time.perf_counter() - t0
            self.done.set()


def run_build(
    job: BuildJob, sampler: Any, weights: Any, changed: np.ndarray, built: Any = None
) -> None:
    """Build or refresh into ``job``; ``weights``: (N, D) snapshot or a function returning it.
    ``built``: an index already built over ``weights`` (``Sampler.prepare``): only its table
    is made."""
    with job.recording():
        if callable(weights):
            weights = weights()
        index = built
        job.kind_done = "build"
        if index is None and job.kind == "refresh" and sampler.has_index:
            index = sampler.refresh(weights, changed)  # None: the sampler declines
            job.kind_done = "build" if index is None else "refresh"
        if index is None:
            index = sampler.build_index(weights)
        job.table = sampler.build_table(index, weights)  # None in feature mode
        job.index = index
