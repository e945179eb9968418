"""Staged rows: W[A_{t+1}] gathered (and copied to the device) while step t computes.

Label-driven selection (``sampler.query=label``) knows step t+1's active set A_{t+1} from
the next batch's labels alone, so ``SampledClassifier`` selects it ahead and ``RowStore``
stages its rows here:

- CUDA with offloaded rows: the rows are gathered into a pinned host buffer and copied with
  ``non_blocking`` on a side stream, overlapping step t's compute; consuming them makes the
  current stream wait on the copy's event;
- otherwise (CPU, or rows already on the device): a plain gather.

Freshness: step t's update (``RowStore.step_``) may move rows that A_{t+1} shares. After each
update the staged positions whose ids were updated are gathered again from W (small: the
overlap only), so step t+1 reads every row as the unpipelined step would. Momentum rows stay
where the update runs (with W: host memory under offload), so they need no staging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


@dataclass
class StagedRows:
    """ids: (M,) CPU int64 local row ids; rows: W[ids] (M, D) on ``device``; event: set when
    the side-stream copy is done (CUDA), else None."""

    ids: torch.Tensor
    rows: torch.Tensor
    device: torch.device
    event: torch.cuda.Event | None = None
    refreshed: int = 0  # rows gathered again after an update (overlap with that step)

    def ready(self) -> torch.Tensor:
        """The rows, safe to read on the current stream."""
        if self.event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(self.event)
            self.rows.record_stream(stream)  # allocated on the side stream, used here
            self.event = None
        return self.rows


def stage_rows(weight: torch.Tensor, ids: torch.Tensor, device: torch.device) -> StagedRows:
    """Start gathering W[ids] (M, D) onto ``device`` (asynchronously from pinned memory)."""
    ids = ids.to("cpu", torch.int64)
    if weight.device.type == "cpu" and device.type == "cuda" and weight.is_pinned():
        buf = torch.empty((ids.numel(), weight.shape[1]), dtype=weight.dtype, pin_memory=True)
        torch.index_select(weight, 0, ids, out=buf)
        stream = _side_stream(device)
        with torch.cuda.stream(stream):
            rows = buf.to(device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return StagedRows(ids, rows, device, event)
    rows = weight.index_select(0, ids.to(weight.device)).to(device)
    return StagedRows(ids, rows, device)


@torch.no_grad()
def refresh_staged(staged: StagedRows, weight: torch.Tensor, updated: torch.Tensor) -> None:
    """After an update of the rows ``updated`` (local ids): gather the staged rows among them
    again from ``weight``, so the staged copy is never stale."""
    hit = torch.isin(staged.ids, updated.to("cpu", torch.int64))
    if not bool(hit.any()):
        return
    pos = torch.nonzero(hit).view(-1)
    fresh = weight.index_select(0, staged.ids[pos].to(weight.device)).to(staged.device)
    staged.ready().index_copy_(0, pos.to(staged.device), fresh)
    staged.refreshed += int(pos.numel())
