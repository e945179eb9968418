"""SelectAhead: step t+1's active set picked during step t (label mode), undone when stale.

``SampledClassifier.forward(features, labels, next_labels)`` selects A_t (taking the one
picked ahead when it still holds), then picks A_{t+1} from ``next_labels`` and stages its
rows (``RowStore.prefetch``). A selection made ahead is used only if, at step t+1, the labels
are the ones it was made for and neither the table (an index swap) nor M changed since;
otherwise the sampler's RNG and counters are restored to before it and step t+1 selects
afresh. So a pipelined run draws exactly what the unpipelined one draws, and a checkpoint
(which undoes a pending selection first) resumes the same.

``prefetch`` knob (``classifier.prefetch``): "auto" selects ahead and stages rows only where
it pays, a CUDA device with offloaded rows; true always (CPU: a plain gather ahead); false
never. Only on one process (under DDP a step's labels are the gathered batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hf_softmax.samplers.active_set import ActiveSet
from hf_softmax.samplers.base import Sampler


def prefetch_setting(value: Any) -> str | bool:
    """``classifier.prefetch`` -> "auto" | True | False; anything else raises."""
    if value is True or value is False or value == "auto":
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ValueError(f"classifier.prefetch must be auto, true or false, got {value!r}")


@dataclass
class Pending:
    """An active set selected ahead: for ``labels`` (B,) CPU, at ``swaps`` / ``num``; ``state``
    is the sampler's selection state before it (to undo it)."""

    active: ActiveSet
    labels: torch.Tensor
    swaps: int
    num: int
    state: dict[str, Any]


class SelectAhead:
    """Holds at most one selection made ahead for one sampler; ``prefetch``: the knob."""

    def __init__(self, prefetch: Any = "auto") -> None:
        self.prefetch = prefetch_setting(prefetch)
        self.pending: Pending | None = None
        self.used = 0  # selections taken from ahead
        self.undone = 0  # selections made ahead and discarded

    def enabled(self, sampler: Sampler, offload: bool, device: torch.device, world: int) -> bool:
        """Whether to select ahead: a label-mode sampler on one process (``world`` 1), and
        ``prefetch`` true, or auto with offloaded rows on a CUDA ``device``."""
        if world != 1 or not sampler.selects_ahead or self.prefetch is False:
            return False
        return self.prefetch is True or (offload and device.type == "cuda")

    def current(self, sampler: Sampler, store: Any, features: torch.Tensor, labels: torch.Tensor):
        """This step's ActiveSet: the one selected ahead when it still holds, else selected
        now from features (B, D) and labels (B,), the rows ``store`` staged for it dropped."""
        active = self.take(sampler, labels)
        if active is None:
            store.staged = None
            active = sampler.select(features.detach(), labels)
        return active

    def take(self, sampler: Sampler, labels: torch.Tensor) -> ActiveSet | None:
        """The active set selected ahead for ``labels`` if it still holds, else None (with
        the sampler restored to before the stale selection)."""
        p, self.pending = self.pending, None
        if p is None:
            return None
        labels = labels.detach().to("cpu", torch.int64).view(-1)
        if p.swaps == sampler.num_swaps and p.num == sampler.num and torch.equal(p.labels, labels):
            self.used += 1
            return p.active
        sampler.restore_selection(p.state)
        self.undone += 1
        return None

    def select(self, sampler: Sampler, labels: torch.Tensor) -> ActiveSet:
        """Select for ``labels`` (the next batch's) now; ``take`` returns it at the next step."""
        labels = labels.detach().to("cpu", torch.int64).view(-1)
        state = sampler.selection_state()
        active = sampler.select(None, labels)
        self.pending = Pending(active, labels, sampler.num_swaps, sampler.num, state)
        return active

    def undo(self, sampler: Sampler | None) -> None:
        """Drop a pending selection, restoring the sampler to before it (checkpoints)."""
        p, self.pending = self.pending, None
        if p is not None and sampler is not None:
            sampler.restore_selection(p.state)
