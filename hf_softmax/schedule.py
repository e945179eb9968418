"""Per-step learning-rate factor and per-epoch seeding of ``HFSoftmaxModule``."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
import torch


def seed_epoch(seed: int, epoch: int) -> None:
    """Seed torch, numpy and random from (seed, epoch)."""
    value = (int(seed) * 1_000_003 + int(epoch) * 7919 + 17) % (2**32)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


@dataclass
class WarmupSchedule:
    """Multiplicative LR factor per optimizer step: linear warmup, then cosine/step/constant.

    Picklable (LambdaLR saves its __dict__ in the checkpoint).
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
