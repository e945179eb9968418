"""IndexRebuild: keeps the sampler's nearest-neighbour index in step with the moving classifier.

Schedule (``interval`` in global optimizer steps):

- before the first step (and again after a resume: the index is never pickled) the index is
  built synchronously from the current weights;
- at every global step that is a multiple of ``interval`` a rebuild starts. The schedule is
  tied to the global step, not to the time of the last build, so a resumed run rebuilds at
  the same steps as an uninterrupted one;
- ``adaptive``: every ``probe_every`` steps the index's recall@``probe_k`` against exact
  top-k (``samplers.exact.exact_topk``) is measured on the current batch's features; when
  it falls below ``min_recall`` a rebuild starts at the next step;
- ``num_schedule`` (optional, ``{step: M}``) changes the active-set size M over training.

``background: false`` builds and swaps inside ``on_train_batch_start`` (the step waits).
``background: true`` copies the weights and builds in a daemon thread (a row a concurrent
step writes may be copied half-updated: the index is approximate anyway, and the row is
marked touched again) and swaps at the first step boundary after the build finished;
the old index serves meanwhile and no step waits for a build. If a rebuild is due while one
is still running it is started as soon as the running one finishes. A build that raises is
logged once with its traceback; training goes on with the old index and the next due
rebuild tries again. Samplers that support ``refresh`` (hnsw) get the rows updated since
the last build (``classifier.pop_touched()``) instead of a full rebuild when they accept it.

Logged: ``index/rebuild_seconds``, ``index/builds``, ``index/recall@k``, ``index/num``.
Counters go into the checkpoint (``state_dict``); the index itself never does.
Samplers without an index (full, random) make this callback a no-op.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from hf_softmax.recall_target import RecallTarget

log = logging.getLogger(__name__)


@dataclass
class RebuildRecord:
    """One finished (or failed) rebuild: steps at start and at swap, build seconds."""

    start_step: int
    swap_step: int
    seconds: float
    kind: str  # "build" | "refresh"
    background: bool
    ok: bool = True


@dataclass
class _Job:
    start_step: int
    kind: str
    done: threading.Event = field(default_factory=threading.Event)
    index: Any = None
    kind_done: str = ""
    seconds: float = 0.0
    error: BaseException | None = None
    trace: str = ""


def _parse_schedule(schedule: Any) -> list[tuple[int, int]]:
    """{step: M} or [[step, M], ...] -> sorted [(step, M)]."""
    if not schedule:
        return []
    items = schedule.items() if isinstance(schedule, Mapping) else schedule
    out = []
    for item in items:
        step, num = item
        out.append((int(step), int(num)))
    return sorted(out)


class IndexRebuild(pl.Callback):
    """Rebuilds ``pl_module.classifier.sampler``'s index; see the module docstring.

    interval: steps between scheduled rebuilds (>= 1). background: build in a thread.
    probe_every: steps between recall probes (0 = never). probe_k: k of recall@k.
    min_recall / adaptive: rebuild when the probed recall < min_recall. num_schedule:
    {step: M}. refresh: allow incremental refresh for samplers that support it.
    """

    def __init__(
        self,
        interval: int = 100,
        background: bool | str = False,
        probe_every: int = 0,
        probe_k: int = 10,
        min_recall: float | None = None,
        adaptive: bool = False,
        num_schedule: Mapping[int, int] | list | None = None,
        refresh: bool = True,
        exact_chunk_size: int = 65536,
        target_recall: float | None = None,
    ) -> None:
        super().__init__()
        if int(interval) < 1:
            raise ValueError(f"IndexRebuild: sampler.interval must be >= 1, got {interval}")
        if int(probe_every) < 0:
            raise ValueError(f"IndexRebuild: sampler.probe_every must be >= 0, got {probe_every}")
        if probe_k is not None and int(probe_k) < 1:
            raise ValueError(f"IndexRebuild: sampler.probe_k must be >= 1, got {probe_k}")
        if adaptive and (int(probe_every) == 0 or min_recall is None):
            raise ValueError(
                "IndexRebuild: adaptive rebuilds need sampler.probe_every >= 1 and "
                f"sampler.min_recall set (got probe_every={probe_every}, min_recall={min_recall})"
            )
        self.interval = int(interval)
        if isinstance(background, str) and background != "auto":
            raise ValueError(f"IndexRebuild: sampler.background must be true, false or auto, got "
                             f"{background!r}")  # fmt: skip
        # "auto": the sampler says (exact: a rebuild is a copy of W, done inline, so runs stay
        # deterministic; annoy/hnsw builds take seconds to minutes: background)
        self.background = background if background == "auto" else bool(background)
        self.probe_every = int(probe_every)
        self.probe_k = None if probe_k is None else int(probe_k)  # None: the step's k
        self.target = None if target_recall is None else RecallTarget(float(target_recall))
        if self.target is not None and self.probe_every <= 0:
            raise ValueError(
                "IndexRebuild: sampler.target_recall needs sampler.probe_every >= 1 (the probe "
                "measures the recall it steers)"
            )
        self.min_recall = float("nan") if min_recall is None else float(min_recall)
        self.adaptive = bool(adaptive)
        self.num_schedule = _parse_schedule(num_schedule)
        self.refresh = bool(refresh)
        self.exact_chunk_size = int(exact_chunk_size)
        # checkpointed counters
        self.builds = 0
        self.refreshes = 0
        self.failures = 0
        self.adaptive_triggers = 0
        self.skipped_busy = 0
        self.probes = 0
        self.last_build_step = -1
        self.last_recall = float("nan")
        self.last_swap_step = 0
        # run-time state (never checkpointed)
        self.history: deque[RebuildRecord] = deque(maxlen=1000)
        self._job: _Job | None = None
        self._thread: threading.Thread | None = None
        self._pending = False
        self._active = False

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _classifier(pl_module: pl.LightningModule) -> Any:
        return getattr(pl_module, "classifier", None)

    @property
    def busy(self) -> bool:
        """A background build is running (not yet swapped in)."""
        return self._job is not None

    def _supports_refresh(self, sampler: Any) -> bool:
        from hf_softmax.samplers.base import Sampler

        return self.refresh and type(sampler).refresh is not Sampler.refresh

    def _run_job(
        self,
        job: _Job,
        sampler: Any,
        weights: np.ndarray | Callable[[], np.ndarray],
        changed: np.ndarray,
    ) -> None:
        """Build or refresh; ``weights`` is the (N, D) snapshot or a function that takes it."""
        t0 = time.perf_counter()
        try:
            if callable(weights):
                weights = weights()
            index = None
            if job.kind == "refresh" and sampler.has_index:
                index = sampler.refresh(weights, changed)
            job.kind_done = "refresh"
            if index is None:
                job.kind_done = "build"
                index = sampler.build_index(weights)
            job.index = index
        except BaseException as e:  # noqa: BLE001 - reported to the training thread
            job.error = e
            job.trace = traceback.format_exc()
        finally:
            job.seconds = time.perf_counter() - t0
            job.done.set()

    def _in_background(self, pl_module: pl.LightningModule) -> bool:
        if self.background != "auto":
            return self.background
        return not self._classifier(pl_module).sampler.inline_build

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, background: bool) -> None:
        classifier = self._classifier(pl_module)
        sampler = classifier.sampler
        step = trainer.global_step
        # pop_touched() between steps; rows updated after it are marked again, so the next
        # refresh picks them up. In background mode the N x D snapshot copy runs in the
        # build thread (torch's copy releases the GIL): a row written by a concurrent step
        # may be copied half-updated, which an approximate index tolerates, while the
        # training step never waits for the copy (~0.3 s at 10^6 x 256).
        changed = classifier.pop_touched()
        weights = classifier.snapshot_weights if background else classifier.snapshot_weights()
        kind = "refresh" if self._supports_refresh(sampler) and sampler.has_index else "build"
        job = _Job(start_step=step, kind=kind)
        self.last_build_step = step
        self._pending = False
        if background:
            self._job = job
            self._thread = threading.Thread(
                target=self._run_job,
                args=(job, sampler, weights, changed),
                name=f"index-rebuild-{step}",
                daemon=True,
            )
            self._thread.start()
        else:
            self._run_job(job, sampler, weights, changed)
            self._finish(trainer, pl_module, job, background=False)

    def _finish(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, job: _Job, background: bool
    ) -> None:
        sampler = self._classifier(pl_module).sampler
        step = trainer.global_step
        if job.error is not None:
            self.failures += 1
            log.error(
                "index rebuild of sampler %r started at step %d failed after %.2fs; training "
                "continues with the previous index, next rebuild retries.\n%s",
                sampler.name,
                job.start_step,
                job.seconds,
                job.trace.rstrip(),
            )
            self.history.append(RebuildRecord(job.start_step, step, job.seconds, job.kind,
                                              background, ok=False))  # fmt: skip
            return
        sampler.swap(job.index)
        self.last_swap_step = step
        if job.kind_done == "refresh":
            self.refreshes += 1
        else:
            self.builds += 1
        self.history.append(RebuildRecord(job.start_step, step, job.seconds, job.kind_done,
                                          background))  # fmt: skip
        log.debug("index %s (%s) at step %d took %.3fs", job.kind_done, sampler.name, step,
                  job.seconds)  # fmt: skip
        self._log(pl_module, "index/rebuild_seconds", job.seconds)
        self._log(pl_module, "index/builds", float(self.builds + self.refreshes))

    def _log(self, pl_module: pl.LightningModule, name: str, value: float) -> None:
        trainer = getattr(pl_module, "_trainer", None)
        if trainer is None or not trainer.training:
            return
        try:
            pl_module.log(name, float(value), on_step=True, on_epoch=False, batch_size=1)
        except Exception as e:  # logging must never break training (e.g. hook not allowed)
            log.debug("IndexRebuild could not log %s: %s", name, e)

    def _collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, wait: bool) -> None:
        job = self._job
        if job is None:
            return
        if wait:
            job.done.wait()
        if job.done.is_set():
            self._job = None
            self._thread = None
            self._finish(trainer, pl_module, job, background=True)

    def _apply_num_schedule(self, pl_module: pl.LightningModule, step: int) -> None:
        if not self.num_schedule:
            return
        num = None
        for s, m in self.num_schedule:
            if s <= step:
                num = m
        # The classifier's M: under DDP the global M, split over the ranks.
        classifier = self._classifier(pl_module)
        if num is not None and num != classifier.num:
            log.info("num_schedule: M %d -> %d at step %d", classifier.num, num, step)
            classifier.num = num

    # -- Lightning hooks -------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        classifier = self._classifier(pl_module)
        sampler = getattr(classifier, "sampler", None)
        self._active = bool(sampler is not None and getattr(sampler, "needs_index", False))
        if not self._active:
            return
        step = trainer.global_step
        self._apply_num_schedule(pl_module, step)
        t0 = time.perf_counter()
        # Synchronous, full: before the first step, and after a resume (indexes are not pickled).
        weights = classifier.snapshot_weights()
        classifier.pop_touched()
        job = _Job(start_step=step, kind="build")
        self._run_job(job, sampler, weights, np.empty(0, np.int64))
        if job.error is not None:
            raise RuntimeError(
                f"initial index build of sampler {sampler.name!r} failed at step {step}"
            ) from job.error
        sampler.swap(job.index)
        self.builds += 1
        self.last_build_step = step
        self.history.append(RebuildRecord(step, step, job.seconds, "build", False))
        rank_zero_info(
            f"IndexRebuild: built {sampler.name} index over {sampler.num_classes} classes in "
            f"{time.perf_counter() - t0:.2f}s (interval {self.interval}, "
            f"background {self.background})"
        )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._active:
            return
        step = trainer.global_step
        self._collect(trainer, pl_module, wait=False)
        self._apply_num_schedule(pl_module, step)
        due = step % self.interval == 0 and step != self.last_build_step
        if due or self._pending:
            if self.busy:
                if due:
                    self.skipped_busy += 1
                self._pending = True
            else:
                self._start(trainer, pl_module, self._in_background(pl_module))

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._active or self.probe_every <= 0:
            return
        step = trainer.global_step  # already counts the step just taken
        if step % self.probe_every != 0:
            return
        features = outputs.get("features") if isinstance(outputs, Mapping) else None
        if features is None:
            return
        sampler = self._classifier(pl_module).sampler
        recall, k = self.probe(pl_module, features)
        self._log(pl_module, f"index/recall@{'k' if self.probe_k is None else k}", recall)
        self._log(pl_module, "index/k", float(k))
        self._log(pl_module, "index/num", float(sampler.num))
        if self.target is not None:
            action = self.target.update(sampler, recall, k, step - self.last_swap_step)
            if action == "rebuild" and not self.busy:
                self._pending = True
            if sampler.effort is not None:
                self._log(pl_module, "index/effort", float(sampler.effort))
        if self.adaptive and recall < self.min_recall and not self.busy:
            self.adaptive_triggers += 1
            log.info("recall@%d = %.3f < %.3f at step %d: rebuilding the index", k, recall,
                     self.min_recall, step)  # fmt: skip
            self._pending = True

    def probe(self, pl_module: pl.LightningModule, features: torch.Tensor) -> tuple[float, int]:
        """(recall@k of the serving index against exact top-k on features (B, D), k); k is
        ``probe_k``, or the k the last selection used when ``probe_k`` is None."""
        from hf_softmax.samplers.exact import exact_topk, recall_at_k

        classifier = self._classifier(pl_module)
        sampler = classifier.sampler
        feats = np.ascontiguousarray(features.detach().to("cpu", torch.float32).numpy())
        k = self.probe_k if self.probe_k is not None else (sampler.last_k or 10)
        k = min(k, sampler.num_classes)
        approx = sampler.query(feats, k)
        exact = exact_topk(
            classifier.snapshot_weights(), feats, k, sampler.metric, self.exact_chunk_size
        )
        recall = recall_at_k(approx, exact)
        self.probes += 1
        self.last_recall = recall
        return recall, k

    def wait(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Block until a running background build is finished and swapped (tests, shutdown)."""
        self._collect(trainer, pl_module, wait=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Do not wait for a running build at the end of training: its result is dropped.
        self._job = None
        self._thread = None
        self._pending = False

    # -- checkpoint ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "builds": self.builds,
            "refreshes": self.refreshes,
            "failures": self.failures,
            "adaptive_triggers": self.adaptive_triggers,
            "skipped_busy": self.skipped_busy,
            "probes": self.probes,
            "last_build_step": self.last_build_step,
            "last_recall": self.last_recall,
            "last_swap_step": self.last_swap_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in (
            "builds",
            "refreshes",
            "failures",
            "adaptive_triggers",
            "skipped_busy",
            "probes",
            "last_build_step",
            "last_swap_step",
        ):
            if key in state_dict:
                setattr(self, key, int(state_dict[key]))
        self.last_recall = float(state_dict.get("last_recall", float("nan")))

    def records(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.history]
