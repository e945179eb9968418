"""ClassifierOutput: what a classifier's forward returns, and all its update needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_softmax.samplers.active_set import ActiveSet


@dataclass
class ClassifierOutput:
    """loss: scalar (the global loss, same on every rank); logits (B, M_r) over the gathered
    batch with the head's margin; targets (B,) int64 into the M_r columns, -1 where the
    target class is on another rank; active: the ActiveSet with GLOBAL class ids (M_r,);
    accuracy: top-1 over the active set(s) on the plain logits (no margin), scalar, no grad;
    rows: the gathered W[A] (M_r, D) leaf whose ``.grad`` backward fills (None without grad);
    row_ids: (M_r,) the same ids local to the rank's RowStore (what ``step`` updates)."""

    loss: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor
    active: ActiveSet
    accuracy: torch.Tensor
    rows: torch.Tensor | None = None
    row_ids: torch.Tensor | None = None
    stepped: bool = False
