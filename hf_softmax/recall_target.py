"""Recall as a setting: keep the probed recall@k of the serving index at ``target_recall``.

A probe measures recall@k of the serving index against exact top-k over the *current* rows
(``callbacks.index_rebuild``). Two things lower it, and each has its own remedy:

- the index finds too few of the true neighbours of its own snapshot (annoy ``search_k``,
  hnsw ``ef``, faiss ``nprobe`` too small). The remedy is more query effort;
- the rows moved since the snapshot (staleness): seen later in the build interval, and
  early in training even right after a swap. The remedy is an earlier rebuild.

So a probe within ``fresh_steps`` of the last swap tunes the effort, and a later one below
the target asks for a rebuild. In feature mode the tuning *measures* (``recall_at``: the
same probe features queried again at another effort, against the same exact top-k):

- below the target, it first asks the cap (``max_factor`` x the default, never past
  ``sampler.effort_limit``, an exhaustive search). If even the cap finds no more (at least
  ``min_gain``), the misses are the rows' drift, not the index's: the effort stays (the
  next stale probe rebuilds). Else the effort doubles to the first that reaches the target,
  or comes within ``min_gain`` of the cap's recall (recall climbs in steps: annoy gains
  nothing until ``search_k`` passes a leaf's worth of items);
- above the target, the effort halves (never below the default) while the halved effort
  still gives ``target + slack / 2``, so an effort set high on structureless rows (``auto``'s
  race on a fresh run) comes down in one probe once the rows take shape.

Label mode cannot re-measure (its table was built at the old effort): one step per fresh
probe, doubling below the target and x 0.75 at ``target + slack`` and above. Samplers
without an effort knob (``exact``; ``auto`` on its exact backend) only rebuild.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


def effort_cap(base: int, limit: int, max_factor: int = 1024) -> int:
    """The most query effort worth trying: ``max_factor`` x the default ``base``, never past
    ``limit`` (``sampler.effort_limit``: an exhaustive search), never below ``base``."""
    return max(base, min(max_factor * base, int(limit)))


@dataclass
class RecallTarget:
    """target: wanted recall@k in (0, 1]. fresh_steps: probes this close to a swap judge the
    index, later ones its staleness. max_factor: effort cap relative to the default (and the
    sampler's ``effort_limit``). min_gain: the recall more effort must add to be worth it."""

    target: float
    fresh_steps: int = 5
    slack: float = 0.1
    max_factor: int = 1024
    min_gain: float = 0.01
    raised: int = 0
    lowered: int = 0
    rebuilds: int = 0
    drift_limited: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < float(self.target) <= 1.0:
            raise ValueError(
                f"callbacks.index_rebuild.target_recall must be in (0, 1], got {self.target}"
            )

    def update(
        self,
        sampler: Any,
        recall: float,
        k: int,
        steps_since_swap: int,
        recall_at: Callable[[int], float] | None = None,
    ) -> str | None:
        """After a probe: adjust ``sampler.effort`` or ask for a rebuild. ``recall_at(effort)``
        (feature mode): the probe's recall at another effort.

        Returns ``"raise"``, ``"lower"``, ``"rebuild"`` or None (nothing to do).
        """
        fresh = steps_since_swap <= self.fresh_steps
        if recall < self.target and not fresh:
            self.rebuilds += 1
            return "rebuild"
        base = sampler.default_effort(k)  # None: no effort knob
        if not fresh or base is None:
            return None
        effort = sampler.effort
        current = base if effort is None or effort < 0 else int(effort)
        cap = effort_cap(base, sampler.effort_limit, self.max_factor)
        if recall_at is None:
            new, there = self._step(recall, current, base, cap), None
        elif recall < self.target:
            new, there = self._search_up(recall, current, cap, recall_at)
        else:
            new, there = self._search_down(current, recall, base, recall_at)
        if new == current:
            return None
        sampler.effort = new
        action = "raise" if new > current else "lower"
        if action == "raise":
            self.raised += 1
        else:
            self.lowered += 1
        measured = "" if there is None else f" (measured there: {there:.3f})"
        log.info("recall@%d = %.3f on a fresh index (target %.3f): query effort %d -> %d%s",
                 k, recall, self.target, current, new, measured)  # fmt: skip
        return action

    def _step(self, recall: float, current: int, base: int, cap: int) -> int:
        """Label mode: one unmeasured step."""
        if recall < self.target:
            return min(2 * current, cap)
        if current > base and recall >= min(1.0, self.target + self.slack):
            return max(base, int(current * 0.75))
        return current

    def _search_up(
        self, recall: float, current: int, cap: int, recall_at: Callable[[int], float]
    ) -> tuple[int, float]:
        """The most effort first: if the cap finds no more (``min_gain``), the misses are the
        rows' drift and the effort stays. Else double to the first effort that reaches the
        target, or comes within ``min_gain`` of what the cap finds."""
        if current >= cap:  # nothing left to raise: no query at the cap, no drift verdict
            return current, recall
        top = recall_at(cap)
        if top - recall < self.min_gain:
            self.drift_limited += 1
            log.debug("recall %.3f below target, %.3f at the effort cap %d: the rows moved "
                      "since the snapshot", recall, top, cap)  # fmt: skip
            return current, recall
        goal = min(self.target, top - self.min_gain)
        effort, got = current, recall
        while effort < cap:
            effort = min(2 * effort, cap)
            got = top if effort == cap else recall_at(effort)
            if got >= goal:
                break
        return effort, got

    def _search_down(
        self, current: int, recall: float, base: int, recall_at: Callable[[int], float]
    ) -> tuple[int, float]:
        """Halve while the halved effort still gives ``target + slack / 2``."""
        best, got = current, recall
        while best > base:
            trial = max(base, best // 2)
            found = recall_at(trial)
            if found < min(1.0, self.target + self.slack / 2):
                break
            best, got = trial, found
        return best, got
