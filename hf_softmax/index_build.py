"""One index rebuild: the record of a build in flight and the build in this process.

A build also makes the sampler's class-neighbour table (label mode) from the fresh index.

``IndexMaintainer`` runs ``run_build`` inline or in a thread; ``build_worker.BuildWorker``
fills the same ``BuildJob`` from a worker process. ``prepare_first_build``: what the sampler
settles before its first build (``auto``'s backend, the same on every DDP rank).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hf_softmax.collectives import rank0_object
from hf_softmax.cores import usable_cores
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
        if index is None:  # label mode: with the table (``table_only``: the table alone)
            index, job.table = sampler.build(weights)
        else:
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


def refreshes(cls: type) -> bool:
    """The sampler class has its own ``refresh`` (hnsw: re-inserts the rows that changed)."""
    from hf_softmax.samplers.base import Sampler

    return cls.refresh is not Sampler.refresh


def run_first_build(job: BuildJob, classifier: Any, ready: Any, worker: Any) -> None:
    """Fill ``job`` with the synchronous first build: by ``worker`` (a ``BuildWorker``, which
    keeps its index to refresh it; the caller drops what ``prepare`` built), else over
    ``ready`` (index, snapshot) with no second build, else from a snapshot of the rows."""
    none = np.empty(0, np.int64)
    if worker is not None:
        worker.run(job, classifier, none)
    elif ready is not None:
        run_build(job, classifier.sampler, ready[1], none, built=ready[0])
    else:
        run_build(job, classifier.sampler, classifier.snapshot_weights(), none)


# N·D from which ``background: auto`` builds in a worker process: below it an annoy build
# takes under 1.4 s (32,768 x 256, one thread), less than the worker's start (2.6 s, 221 MiB)
PROCESS_MIN_ELEMENTS = 2**23
_SHM = "/dev/shm"


def background_mode(background: bool | str, sampler: Any, elements: int = 0) -> str:
    """How a rebuild runs, "inline", "thread" or "process", for ``RebuildSettings.background``
    (``auto``: ``auto_background``'s choice for ``elements`` = N·D). A sampler whose index
    loads only under the GIL (``loads_with_gil``: hnsw) and that queries it in the training
    process builds in a thread instead of a worker: its build releases the GIL, a load would
    hold it inside a step."""
    if background == "auto":
        return auto_background(sampler, elements)[0]
    if background is True or background is False:
        return "thread" if background else "inline"
    if background == "process" and sampler.loads_with_gil and sampler.queries_features:
        return "thread"
    return str(background)


def auto_background(sampler: Any, elements: int) -> tuple[str, str]:
    """``background: auto``: (mode, why). Inline for samplers whose build is a copy (exact);
    a worker process from ``PROCESS_MIN_ELEMENTS`` rows·dims where the shared block fits
    twice in /dev/shm (an annoy build thread holds the GIL per row added: its longest step
    2.7x the median at 10^5 x 256, against 1.6x beside a worker; docs/benchmarks.md); a
    thread otherwise."""
    if sampler.inline_build:
        return "inline", "its build is a copy of W"
    if sampler.loads_with_gil and sampler.queries_features:
        return "thread", "its index would load into the trainer under the GIL"
    if elements < PROCESS_MIN_ELEMENTS:
        return "thread", f"N·D = {elements:,} < {PROCESS_MIN_ELEMENTS:,}: a short build"
    if not os.path.isdir(_SHM):
        return "thread", f"no {_SHM} for the worker's shared block"
    need, free = 2 * 4 * elements, shutil.disk_usage(_SHM).free
    if free < need:
        return "thread", (f"{_SHM} has {free / 2**30:.2f} GiB free, a worker needs "
                          f"{need / 2**30:.2f} GiB (docker: --shm-size)")  # fmt: skip
    return "process", f"N·D = {elements:,}: a build worker never holds the trainer's GIL"


def worker_threads(build_threads: int | None) -> int:
    """The build worker's threads: ``build_threads`` when set, else the cores the trainer's
    torch threads leave free, at least one. A worker as wide as the machine fights the
    step for its cores: at 10^5 x 256 on 2 cores beside 2 torch threads (annoy, ten runs
    side by side) the longest step during a build was 2.42x the median (1.82-3.41x) with 2
    build threads, 2.23x (2.15-3.25x) with 1, the build as long (docs/benchmarks.md)."""
    if build_threads is not None:
        return int(build_threads)
    import torch

    return max(1, usable_cores() - torch.get_num_threads())


def settle_upkeep(sampler: Any, settings: Any, mode: str, auto: tuple[str, str] | None) -> None:
    """After the first build, before the first step, where a pause costs no step. ``mode``:
    ``background_mode``'s; ``auto``: ``auto_background``'s choice (logged with its reason).
    Where it runs ``background: process`` in a thread, the build takes
    ``settings.build_threads`` threads there (the sampler's ``build_threads``) and the log
    says why. A sampler that refreshes in this process gets ready for it
    (``Sampler.ready_for_refresh``: hnsw copies its spare graph now, not in a step)."""
    if auto is not None:
        log.info("sampler %s: background=auto rebuilds %s (%s)", sampler.name,
                 {"inline": "inside the step", "thread": "in a thread",
                  "process": "in a build worker process"}[auto[0]], auto[1])  # fmt: skip
    if settings.background == "process" and mode == "thread":
        if settings.build_threads is not None:
            sampler.build_threads = int(settings.build_threads)
        log.info("sampler %s: background=process builds in a thread of the training process "
                 "(%s build threads): its index would load under the GIL, inside a step, while "
                 "its build releases the GIL", sampler.name,
                 settings.build_threads or "its own")  # fmt: skip
    if settings.refresh and mode != "process":
        sampler.ready_for_refresh()
