"""Learning-rate schedule (linear warmup, then cosine / step / constant, per optimizer step)
and the per-epoch seeding of training.

``conf/scheduler/<kind>.yaml`` targets ``warmup_scheduler`` with ``_partial_: true``; the
module calls the partial with the optimizer, the trainer's estimated number of steps and the
steps per epoch (``milestones`` are given in epochs). The classifier rows read the lr of the
optimizer's first group each step, so they follow the same schedule.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

SCHEDULES = ("cosine", "step", "constant")


def seed_epoch(seed: int, epoch: int) -> None:
    """Seed torch, numpy and random from (seed, epoch)."""
    value = (int(seed) * 1_000_003 + int(epoch) * 7919 + 17) % (2**32)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


@dataclass
class WarmupSchedule:
    """Multiplicative LR factor per optimizer step: linear warmup, then cosine/step/constant.

    Picklable (LambdaLR saves its __dict__ in the checkpoint; the field names are the ones
    checkpoints have always held, so old checkpoints resume).
    """

    total_steps: int
    warmup_steps: int = 0
    warmup_start_factor: float = 0.01
    schedule: str = "cosine"
    milestones: list[int] = field(default_factory=list)  # in steps
    gamma: float = 0.1
    min_lr_factor: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            s = self.warmup_start_factor
            return s + (1.0 - s) * step / self.warmup_steps
        if self.schedule == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            t = min(1.0, (step - self.warmup_steps) / span)
            return self.min_lr_factor + (1 - self.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * t))
        if self.schedule == "step":
            return self.gamma ** sum(step >= m for m in self.milestones)
        return 1.0


def warmup_scheduler(
    optimizer: torch.optim.Optimizer,
    estimated_steps: int | Callable[[], int],
    steps_per_epoch: int | Callable[[int], int],
    schedule: str = "cosine",
    warmup_steps: int = 0,
    warmup_start_factor: float = 0.01,
    milestones: list[float] | None = None,
    gamma: float = 0.1,
    min_lr_factor: float = 0.0,
    total_steps: int | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over ``WarmupSchedule``, stepped once per optimizer step.

    estimated_steps: the run's length (``trainer.estimated_stepping_batches``), or a callable
    returning it, used (called) only when ``total_steps`` is not set: asking a trainer for it
    sets up the train loader, which would lose a mid-epoch resume position.
    steps_per_epoch: converts ``milestones`` (epochs) into steps; or a callable given the
    schedule's total steps (for a loader not set up yet: total / epochs).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"scheduler.schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not total_steps:
        total_steps = estimated_steps() if callable(estimated_steps) else estimated_steps
    total_steps = int(total_steps)
    per_epoch = steps_per_epoch(total_steps) if callable(steps_per_epoch) else steps_per_epoch
    per_epoch = max(1, int(per_epoch))
    lam = WarmupSchedule(
        total_steps=int(total_steps),
        warmup_steps=int(warmup_steps or 0),
        warmup_start_factor=float(warmup_start_factor),
        schedule=str(schedule),
        milestones=[int(round(float(e) * per_epoch)) for e in (milestones or [])],
        gamma=float(gamma),
        min_lr_factor=float(min_lr_factor),
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lam)
