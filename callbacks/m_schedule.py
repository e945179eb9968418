"""MSchedule: changes M (active classes per step) over training, ``{step: M}``.

``callbacks.m_schedule.schedule`` is ``{step: M}`` or ``[[step, M], ...]``; from each listed
global step on, ``pl_module.classifier.num`` is that M (under DDP the global M, which the
class-sharded ``SampledClassifier`` splits over the ranks). Tied to the global step, so a
resumed run follows the same schedule. ``null`` / empty: M stays ``sampler.num``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl

log = logging.getLogger(__name__)


def parse_schedule(schedule: Any) -> list[tuple[int, int]]:
    """{step: M} or [[step, M], ...] -> sorted [(step, M)]."""
    if not schedule:
        return []
    items = schedule.items() if isinstance(schedule, Mapping) else schedule
    out = []
    for item in items:
        try:
            step, num = item
            out.append((int(step), int(num)))
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"callbacks.m_schedule.schedule: expected {{step: M}} or [[step, M], ...] with "
                f"integers, got item {item!r}"
            ) from e
    return sorted(out)


def m_at(schedule: list[tuple[int, int]], step: int) -> int | None:
    """The M the schedule sets at ``step`` (None before its first entry)."""
    num = None
    for s, m in schedule:
        if s <= step:
            num = m
    return num


class MSchedule(pl.Callback):
    """Sets ``pl_module.classifier.num`` from ``schedule`` before each step."""

    def __init__(self, schedule: Mapping[int, int] | list | None = None) -> None:
        super().__init__()
        self.schedule = parse_schedule(schedule)

    def _apply(self, pl_module: pl.LightningModule, step: int) -> None:
        classifier = getattr(pl_module, "classifier", None)
        num = m_at(self.schedule, step)
        if classifier is not None and num is not None and num != classifier.num:
            log.info("m_schedule: M %d -> %d at step %d", classifier.num, num, step)
            classifier.num = num

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply(pl_module, trainer.global_step)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._apply(pl_module, trainer.global_step)
