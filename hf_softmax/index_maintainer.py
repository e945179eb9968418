"""IndexMaintainer: keeps a sampled classifier's nearest-neighbour index in step with its rows.

Plain Python, no Lightning: ``callbacks.index_rebuild.IndexRebuild`` adapts it to a Trainer,
and the benchmarks drive it directly. The classifier gives ``sampler``, ``weight`` (its live
rows, which a process build copies straight into shared memory), ``snapshot_weights()``
((N, D) float32 copy), ``pop_touched()`` (ids updated since the last call), ``num``, ``metric``.

Schedule (``interval`` in global optimizer steps): ``start(step)``, before the first step
(and after a resume: the index is never saved), builds synchronously; ``on_step_start(step)``
at every multiple of ``interval`` starts a rebuild (tied to the global step, so a resumed
run rebuilds at the same steps as an uninterrupted one); ``on_step_end(step, features)``
every ``probe_every`` steps measures recall@k of the index (label mode: its table) on the
step's features against the rows as the step's selection saw them
(``hf_softmax.recall_probe``); ``adaptive`` rebuilds at the next step when it falls below
``min_recall``, ``target_recall`` tunes the query effort or rebuilds early.

Build modes (``RebuildSettings.background``, ``index_build.background_mode``): inline (the
step waits); a thread (snapshot and build in a daemon thread; a row a concurrent step writes
may be copied half-updated, and is marked touched again); a process (``build_worker``; hnsw
in feature mode: a thread, its graph loads under the GIL); ``auto``: chosen once at ``start``
(``index_build.auto_background``: a process from N·D = 2^23). A finished build is swapped in
at the next step start, the old index serving meanwhile; one due while one runs starts after
it. A build that raises is logged with its traceback; the old index serves on and the next
due rebuild retries. A sampler's ``refresh`` (hnsw) gets the rows updated since the last.

Each hook returns the metrics to log: ``index/rebuild_seconds``, ``index/builds``,
``index/recall@k`` (``@<k>`` with a fixed ``probe_k``), ``index/k``, ``index/num``,
``index/effort``. Counters are ``state_dict()``; the index never is. Samplers without an
index (full, random) make every hook a no-op. Label mode's ``table_only``: the table alone."""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from hf_softmax.build_worker import BuildWorker
from hf_softmax.index_build import (
    BuildJob,
    auto_background,
    background_mode,
    prepare_first_build,
    refreshes,
    run_build,
    run_first_build,
    settle_upkeep,
    worker_threads,
)
from hf_softmax.rebuild_settings import RebuildRecord, RebuildSettings
from hf_softmax.recall_probe import measure_recall
from hf_softmax.recall_target import RecallTarget

log = logging.getLogger(__name__)

COUNTERS = ("builds", "refreshes", "failures", "adaptive_triggers", "skipped_busy", "probes",
            "last_build_step", "last_swap_step")  # fmt: skip


class IndexMaintainer:
    """Rebuilds ``classifier.sampler``'s index; see the module docstring for the schedule.

    classifier: a SampledClassifier (any object with the members the module docstring names).
    settings (or the same knobs as keywords): ``RebuildSettings``.
    """

    def __init__(
        self, classifier: Any, settings: RebuildSettings | None = None, **knobs: Any
    ) -> None:
        if settings is not None and knobs:
            raise TypeError(f"IndexMaintainer: pass settings or knobs, not both ({sorted(knobs)})")
        self.classifier = classifier
        self.settings = settings if settings is not None else RebuildSettings(**knobs)
        s = self.settings
        self.target = None if s.target_recall is None else RecallTarget(float(s.target_recall))
        self.min_recall = float("nan") if s.min_recall is None else float(s.min_recall)
        for name in COUNTERS:  # checkpointed
            setattr(self, name, 0)
        self.last_build_step = -1
        self.last_recall = float("nan")
        self.history: deque[RebuildRecord] = deque(maxlen=1000)  # run-time only from here
        self._job: BuildJob | None = None
        self._pending = False
        self._worker: Any = None  # the build process, started on the first process build
        self._choice: dict[str, Any] | None = None  # a checkpoint's sampler choice (auto)
        self._auto: tuple[str, str] | None = None  # background auto: (mode, why), at start

    # -- state -----------------------------------------------------------------------------
    @property
    def sampler(self) -> Any:
        return self.classifier.sampler

    @property
    def active(self) -> bool:
        """The sampler has an index to maintain (not full / random)."""
        return bool(getattr(self.sampler, "needs_index", False))

    @property
    def busy(self) -> bool:
        """A background build is running (not yet swapped in)."""
        return self._job is not None

    @property
    def worker(self) -> Any:
        """The ``BuildWorker`` of ``background: process`` (None until its first build)."""
        return self._worker

    def mode(self) -> str:
        """How the next rebuild runs: "inline", "thread" or "process" (``background_mode``;
        ``auto``: as ``start`` chose it, before its worker's block took /dev/shm)."""
        if self._auto is not None:
            return self._auto[0]
        elements = int(self.classifier.weight.numel())  # N·D (this rank's rows)
        return background_mode(self.settings.background, self.sampler, elements)

    def records(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.history]

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {name: getattr(self, name) for name in COUNTERS}
        state["last_recall"] = self.last_recall
        live = self.classifier is not None and self.active  # not yet attached: as loaded
        choice = (live and self.sampler.choice) or self._choice
        if choice:  # auto's backend (and effort): a resume builds the same
            state["sampler_choice"] = choice
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in COUNTERS:
            if name in state:
                setattr(self, name, int(state[name]))
        self.last_recall = float(state.get("last_recall", float("nan")))
        self._choice = state.get("sampler_choice")  # restored into the sampler by start()

    # -- hooks -----------------------------------------------------------------------------
    def start(self, step: int) -> dict[str, float]:
        """Synchronous full build before the first step (and after a resume)."""
        if not self.active:
            return {}
        sampler = self.sampler
        self.classifier.pop_touched()
        job = BuildJob(start_step=step, kind="build", background=False)
        target = None if self.target is None else self.target.target
        ready = prepare_first_build(self.classifier, target, self._choice)
        auto = self.settings.background == "auto"  # chosen now the sampler's backend is known
        self._auto = auto_background(sampler, int(self.classifier.weight.numel())) if auto else None
        mode = self.mode()
        worker = self._process_worker() if mode == "process" else None
        if worker is not None:  # the worker builds its own (it keeps the index): free this one
            ready = None
        run_first_build(job, self.classifier, ready, worker)
        if job.error is not None:
            msg = f"initial index build of sampler {sampler.name!r} failed at step {step}"
            raise RuntimeError(msg) from job.error
        sampler.swap(job.index, job.table)
        settle_upkeep(sampler, self.settings, mode, self._auto)
        self.builds += 1
        self.last_build_step = step
        self.history.append(RebuildRecord(step, step, job.seconds, "build", False))
        what = "class table (no index: table_trees)" if sampler.table_only else "index"
        log.info("built the %s %s over %d classes in %.2fs (interval %d, background %s)",
                 sampler.name, what, sampler.num_classes, job.seconds, self.settings.interval,
                 self.settings.background)  # fmt: skip
        return {}

    def on_step_start(self, step: int) -> dict[str, float]:
        """Before global step ``step``: swap in a finished build, start a due one."""
        if not self.active:
            return {}
        metrics = self._collect(step, wait=False)
        due = step % self.settings.interval == 0 and step != self.last_build_step
        if due or self._pending:
            if self.busy:
                self.skipped_busy += int(due)
                self._pending = True
            else:
                metrics.update(self._start(step))
        return metrics

    def on_step_end(self, step: int, features: torch.Tensor | None) -> dict[str, float]:
        """After a step (``step`` counts it): the recall probe on its features (B, D)."""
        s = self.settings
        if not self.active or s.probe_every <= 0 or step % s.probe_every or features is None:
            return {}
        sampler = self.sampler
        recall, k, recall_at = self._measure(features)
        metrics = {
            f"index/recall@{'k' if s.probe_k is None else k}": recall,
            "index/k": float(k),
            "index/num": float(sampler.num),
        }
        if self.target is not None:
            action = self.target.update(sampler, recall, k, step - self.last_swap_step, recall_at)
            if action == "rebuild" and not self.busy:
                self._pending = True
            if sampler.effort is not None:
                metrics["index/effort"] = float(sampler.effort)
        if s.adaptive and recall < self.min_recall and not self.busy:
            self.adaptive_triggers += 1
            log.info("recall@%d = %.3f < %.3f at step %d: rebuilding the index", k, recall,
                     self.min_recall, step)  # fmt: skip
            self._pending = True
        return metrics

    def probe(self, features: torch.Tensor | np.ndarray) -> tuple[float, int]:
        """(recall@k, k) of the serving index (label mode: its table) on features (B, D)
        (``hf_softmax.recall_probe``)."""
        return self._measure(features)[:2]

    def _measure(self, features: torch.Tensor | np.ndarray) -> tuple[float, int, Any]:
        """``probe`` plus ``recall_at(effort)`` (feature mode; else None) for the target."""
        weights = self.classifier.snapshot_weights(as_selected=True)  # as the step selected
        recall, k, recall_at = measure_recall(self.sampler, weights, features,
                                              self.settings.probe_k,
                                              self.settings.exact_chunk_size)  # fmt: skip
        self.probes += 1
        self.last_recall = recall
        return recall, k, recall_at

    def wait(self, step: int) -> dict[str, float]:
        """Block until a running background build is finished and swapped (tests, shutdown)."""
        return self._collect(step, wait=True)

    def close(self) -> None:
        """Drop a running build (its result is never swapped in) and stop the build worker."""
        self._job = None
        self._pending = False
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    # -- rebuilds --------------------------------------------------------------------------
    def _start(self, step: int) -> dict[str, float]:
        classifier, sampler, mode = self.classifier, self.sampler, self.mode()
        refresh = self.settings.refresh and refreshes(type(sampler))
        kind = "refresh" if refresh and sampler.has_index else "build"
        job = BuildJob(start_step=step, kind=kind, background=mode != "inline")
        self.last_build_step = step
        self._pending = False
        # pop_touched() between steps; rows updated after it are marked again, so the next
        # refresh picks them up. In the background the N x D snapshot copy runs off the
        # training thread (torch's copy releases the GIL): the step never waits for it
        # (~0.3 s at 10^6 x 256).
        changed = classifier.pop_touched()
        job.changed = int(changed.size)
        if mode == "inline":
            run_build(job, sampler, classifier.snapshot_weights(), changed)
            return self._finish(step, job)
        if mode == "process":
            target, args = self._process_worker().run, (job, classifier, changed)
        else:
            target, args = run_build, (job, sampler, classifier.snapshot_weights, changed)
        self._job = job
        threading.Thread(target=target, args=args, name=f"index-rebuild-{step}",
                         daemon=True).start()  # fmt: skip
        return {}

    def _process_worker(self) -> Any:
        if self._worker is None:
            self._worker = BuildWorker(self.sampler, worker_threads(self.settings.build_threads),
                                       self.settings.worker_memory)  # fmt: skip
        return self._worker

    def _collect(self, step: int, wait: bool) -> dict[str, float]:
        job = self._job
        if job is None:
            return {}
        if wait:
            job.done.wait()
        if not job.done.is_set():
            return {}
        self._job = None
        return self._finish(step, job)

    def _finish(self, step: int, job: BuildJob) -> dict[str, float]:
        sampler = self.sampler
        if job.error is not None:
            self.failures += 1
            log.error("index rebuild of sampler %r started at step %d failed after %.2fs; "
                      "training continues with the previous index, next rebuild retries.\n%s",
                      sampler.name, job.start_step, job.seconds, job.trace.rstrip())  # fmt: skip
            self.history.append(RebuildRecord(job.start_step, step, job.seconds, job.kind,
                                              job.background, False, job.changed))  # fmt: skip
            return {}
        sampler.swap(job.index, job.table)
        self.last_swap_step = step
        if job.kind_done == "refresh":
            self.refreshes += 1
        else:
            self.builds += 1
        self.history.append(RebuildRecord(job.start_step, step, job.seconds, job.kind_done,
                                          job.background, True, job.changed))  # fmt: skip
        log.debug("index %s (%s) at step %d took %.3fs", job.kind_done, sampler.name, step,
                  job.seconds)  # fmt: skip
        return {"index/rebuild_seconds": job.seconds,
                "index/builds": float(self.builds + self.refreshes)}  # fmt: skip
