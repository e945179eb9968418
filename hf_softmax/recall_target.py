"""Recall as a setting: keep the probed recall@k of the serving index at ``target_recall``.

A probe measures recall@k of the serving index against exact top-k over the *current* rows
(``callbacks.index_rebuild``). Two things lower it, and each has its own remedy:

- the index finds too few of the true neighbours of its own snapshot (annoy ``search_k``,
  hnsw ``ef`` too small): seen right after a swap, when the rows have barely moved. The
  remedy is more query effort: ``effort`` doubles (up to ``max_factor`` x the default, and
  never past N: annoy inspecting N nodes or hnsw with ef = N is an exhaustive search);
- the rows moved since the snapshot (staleness): seen later in the build interval. The
  remedy is an earlier rebuild.

So a probe within ``fresh_steps`` of the last swap tunes the effort (and lowers it again
when recall sits well above the target, ``slack``), and a later one asks for a rebuild.
Samplers without an effort knob (``exact``; ``auto`` on its exact backend) only rebuild.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


def effort_cap(base: int, num_classes: int, max_factor: int = 1024) -> int:
    """The most query effort worth trying: ``max_factor`` x the default ``base``, never past
    N (an exhaustive search), never below ``base``."""
    return max(base, min(max_factor * base, int(num_classes)))


@dataclass
class RecallTarget:
    """target: wanted recall@k in (0, 1]. fresh_steps: probes this close to a swap judge the
    index, later ones its staleness. max_factor: effort cap relative to the default (and N)."""

    target: float
    fresh_steps: int = 5
    slack: float = 0.1
    max_factor: int = 1024
    raised: int = 0
    lowered: int = 0
    rebuilds: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < float(self.target) <= 1.0:
            raise ValueError(
                f"callbacks.index_rebuild.target_recall must be in (0, 1], got {self.target}"
            )

    def update(self, sampler: Any, recall: float, k: int, steps_since_swap: int) -> str | None:
        """After a probe: adjust ``sampler.effort`` or ask for a rebuild.

        Returns ``"raise"``, ``"lower"``, ``"rebuild"`` or None (nothing to do).
        """
        effort, base = sampler.effort, sampler.default_effort(k)  # None: no effort knob
        fresh = steps_since_swap <= self.fresh_steps
        if recall < self.target:
            if not fresh:
                self.rebuilds += 1
                return "rebuild"
            if base is None:
                return None  # exact: a fresh index has perfect recall; nothing to raise
            current = base if effort is None or effort < 0 else int(effort)
            cap = effort_cap(base, sampler.num_classes, self.max_factor)
            if current >= cap:
                return None
            sampler.effort = min(2 * current, cap)
            self.raised += 1
            log.info("recall@%d = %.3f < %.3f on a fresh index: query effort %d -> %d",
                     k, recall, self.target, current, sampler.effort)  # fmt: skip
            return "raise"
        if fresh and base is not None and effort is not None and effort > base:
            if recall >= min(1.0, self.target + self.slack):
                sampler.effort = max(base, int(effort * 0.75))
                self.lowered += 1
                return "lower"
        return None
