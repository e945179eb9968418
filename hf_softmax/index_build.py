"""One index rebuild: the record of a build in flight and the build in this process.

A build also makes the sampler's class-neighbour table (label mode) from the fresh index.

``IndexMaintainer`` runs ``run_build`` inline or in a thread; ``build_worker.BuildWorker``
fills the same ``BuildJob`` from a worker process. ``prepare_first_build``: what the sampler
settles before its first build (``auto``'s backend, the same on every DDP rank).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hf_softmax.collectives import rank0_object
from hf_softmax.page_release import release_array

log = logging.getLogger(__name__)


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
    """Build or refresh into ``job``; ``weights``: (N, D) snapshot or a function returning a
    fresh one (a copy nobody else holds).
    ``built``: an index already built over ``weights`` (``Sampler.prepare``): only its table
    is made. A snapshot taken here is handed back to the kernel before ``done`` (GIL
    released): freed as it was, in this thread under the GIL, a 1 GB one held a step for
    ~55 ms (``page_release``)."""
    with job.recording():
        taken = callable(weights)
        if taken:
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
        if taken and not _aliases(index, weights):  # indexes copy their rows (build_index)
            release_array(weights)


def _aliases(index: Any, weights: np.ndarray) -> bool:
    """An array or tensor ``index`` that shares memory with ``weights``."""
    if hasattr(index, "numpy") and getattr(index, "device", None) is not None:
        index = index.numpy() if index.device.type == "cpu" else None
    return isinstance(index, np.ndarray) and np.shares_memory(index, weights)


def prepare_first_build(classifier: Any, target: float | None, restored: Any) -> Any:
    """Before the first build: restore a checkpoint's sampler ``choice`` (``restored``), let
    the sampler ``prepare`` (``auto`` chooses its backend, racing for ``target`` recall),
    then make every rank of ``classifier.group`` serve rank 0's choice. Returns what
    ``prepare`` built, (index, snapshot), or None (also when this rank adopted another
    choice)."""
    sampler = classifier.sampler
    sampler.choice = restored  # auto: the backend of the checkpoint, no new race
    shape = tuple(classifier.weight.shape)
    ready = sampler.prepare(shape, classifier.snapshot_weights, target)
    if sampler.choice is not None:  # timing may differ between ranks: rank 0 decides
        agreed = rank0_object(sampler.choice, getattr(classifier, "group", None))
        if agreed != sampler.choice:
            sampler.adopt(agreed)
            ready = None  # built for another backend
    return ready


def background_mode(background: bool | str, sampler: Any) -> str:
    """How a rebuild runs, "inline", "thread" or "process", for ``RebuildSettings.background``.
    A sampler whose index loads only under the GIL (``loads_with_gil``: hnsw) and that
    queries it in the training process builds in a thread instead of a worker: its build
    releases the GIL, a load would hold it inside a step."""
    if background == "auto":
        return "inline" if sampler.inline_build else "thread"
    if background is True or background is False:
        return "thread" if background else "inline"
    if background == "process" and sampler.loads_with_gil and sampler.queries_features:
        return "thread"
    return str(background)


def settle_upkeep(sampler: Any, settings: Any, mode: str) -> None:
    """After the first build, before the first step, where a pause costs no step. ``mode``:
    ``background_mode``'s. Where it runs ``background: process`` in a thread, the build takes
    ``settings.build_threads`` threads there (the sampler's ``build_threads``) and the log
    says why. A sampler that refreshes in this process gets ready for it
    (``Sampler.ready_for_refresh``: hnsw copies its spare graph now, not in a step)."""
    if settings.background == "process" and mode == "thread":
        if settings.build_threads is not None:
            sampler.build_threads = int(settings.build_threads)
        log.info("sampler %s: background=process builds in a thread of the training process "
                 "(%s build threads): its index would load under the GIL, inside a step, while "
                 "its build releases the GIL", sampler.name,
                 settings.build_threads or "its own")  # fmt: skip
    if settings.refresh and mode != "process":
        sampler.ready_for_refresh()
