"""RowStore: classifier rows outside autograd for a class range [start, end), updated lazily.

Owns W (n, D) float32, its momentum (n, D) and a touched (n,) bool mask, n = end - start (all
N classes on one process, the rank's shard under DDP). Ids given to its methods are LOCAL
(row indices 0..n-1); ``argmax``/``topk`` return global class ids (+ ``start``).

Sparse SGD (``step_``): only the rows of the step's active set move, by the rule of
``hf_softmax.row_update`` (``row_momentum`` lazy | immediate, ``row_norm``).

Offload: W and momentum stay in host memory (pinned when the compute device is CUDA) and
only W[A] (M, D) crosses to the device per step. ``prefetch`` stages the next step's W[A]
ahead (``hf_softmax.row_prefetch``); ``gather`` of the same ids takes it, kept fresh by
``step_``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from hf_softmax.heads import MarginHead
from hf_softmax.row_prefetch import StagedRows, refresh_staged, stage_rows
from hf_softmax.row_search import argmax_rows, topk_rows
from hf_softmax.row_update import check_row_momentum, project_rows, sgd_rows

INIT_BLOCK = 65536  # rows per independently seeded block of the initial W


def initial_rows(
    start: int, end: int, num_classes: int, dim: int, std: float, seed: int, block: int = INIT_BLOCK
) -> torch.Tensor:
    """Rows [start, end) of the initial (num_classes, dim) W ~ N(0, std), however it is split.

    Rows come in whole blocks of ``block`` seeded by (seed, block index), so every world size
    gets the same W and no rank materialises all N rows. Block 0 is seeded with ``seed``
    itself: for N <= ``block`` this is ``torch.empty(N, dim).normal_(0, std)`` from a generator
    seeded with ``seed``.
    """
    out = torch.empty(end - start, dim)
    index = start // block
    while index * block < end:
        b0, b1 = index * block, min((index + 1) * block, num_classes)
        lo, hi = max(b0, start), min(b1, end)
        gen = torch.Generator().manual_seed(
            int(seed) if index == 0 else int(seed) * 1_000_003 + index
        )
        rows = torch.empty(b1 - b0, dim).normal_(0.0, std, generator=gen)
        out[lo - start : hi - start] = rows[lo - b0 : hi - b0]
        index += 1
    return out


class RowStore:
    """W (n, D), momentum (n, D) and touched (n,) of the classes [start, start + n).

    weight: the rows, used in place (no copy: device and pinning are kept); momentum starts
    at zero in the same place. mu, weight_decay: the SGD of ``step_``.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        start: int = 0,
        mu: float = 0.9,
        weight_decay: float = 5e-4,
        offload: bool = False,
        row_norm: float | None = None,
        row_momentum: str = "lazy",
    ) -> None:
        if weight.dim() != 2:
            raise ValueError(f"row store: weight must be (n, D), got shape {tuple(weight.shape)}")
        self.weight = weight.detach()
        self.row_momentum = check_row_momentum(row_momentum)
        kept = weight if self.row_momentum == "lazy" else weight[:0]  # immediate: (0, D), none
        self.momentum_buffer = torch.zeros_like(kept, pin_memory=weight.is_pinned())
        self.touched = torch.zeros(weight.shape[0], dtype=torch.bool)
        self.start = int(start)
        self.mu = float(mu)
        self.weight_decay = float(weight_decay)
        self.offload = bool(offload)
        self.row_norm = None if row_norm is None else float(row_norm)
        if self.row_norm is not None:
            if self.row_norm <= 0:
                raise ValueError(f"row store: row_norm must be > 0 or None, got {row_norm}")
            self.weight.copy_(project_rows(self.weight, self.row_norm))
        self.num_updates = 0
        self.staged: StagedRows | None = None  # the next step's rows (``prefetch``)
        self.staged_hits = 0  # gathers served from staged rows
        self.before_step: tuple[torch.Tensor, torch.Tensor] | None = None  # last step_'s rows

    @property
    def end(self) -> int:
        return self.start + self.num_rows

    @property
    def range(self) -> tuple[int, int]:
        """[start, end): the classes held here."""
        return self.start, self.end

    @property
    def num_rows(self) -> int:
        return int(self.weight.shape[0])

    def sliced(self, start: int, end: int) -> RowStore:
        """A store of the classes [start, end) (within this one's) with copies of their state."""
        lo, hi = start - self.start, end - self.start
        out = RowStore(
            self.weight[lo:hi].clone(),
            start,
            self.mu,
            self.weight_decay,
            self.offload,
            self.row_norm,
            self.row_momentum,
        )
        if self.row_momentum == "lazy":
            out.momentum_buffer.copy_(self.momentum_buffer[lo:hi])
        out.touched.copy_(self.touched[lo:hi])
        out.num_updates = self.num_updates
        return out

    # -- placement -------------------------------------------------------------------------
    def place(self, device: torch.device | str) -> None:
        """Where the rows live for compute on ``device``: there, or with offload in host
        memory, pinned when ``device`` is CUDA so the per-step gathers copy asynchronously."""
        device = torch.device(device)
        self.staged = None
        if not self.offload:
            self.apply_(lambda t: t.to(device))
            return
        w, v = self.weight.to("cpu"), self.momentum_buffer.to("cpu")
        if device.type == "cuda" and not w.is_pinned():
            w, v = w.pin_memory(), v.pin_memory()
        self.weight, self.momentum_buffer = w, v

    def apply_(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """``nn.Module._apply``'s ``fn`` (``.to``, ``.cuda``) on W and momentum, unless offload."""
        if not self.offload:
            self.staged = None
            self.weight, self.momentum_buffer = fn(self.weight), fn(self.momentum_buffer)

    # -- training --------------------------------------------------------------------------
    @torch.no_grad()
    def nonfinite(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (M,) local int64 -> the ids whose rows hold NaN/Inf now, in order."""
        ok = torch.isfinite(self.weight[ids.to(self.weight.device)]).all(dim=1)
        return ids[~ok.cpu()]

    def gather(self, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        """ids (M,) CPU int64 local -> W[ids] (M, D) on ``device``, a fresh autograd leaf that
        requires grad when grad is enabled (backward fills the ``.grad`` that ``step_`` uses).
        Rows staged by ``prefetch`` for the same ids and device are taken instead."""
        w, staged, self.staged = self.weight, self.staged, None
        if staged is not None and staged.device == device and torch.equal(staged.ids, ids.cpu()):
            self.staged_hits += 1
            rows = staged.ready()
        elif w.device == device:
            rows = w.index_select(0, ids.to(device))
        elif w.device.type == "cpu" and device.type == "cuda":
            # Fresh pinned buffer from torch's caching host allocator: it records the copy's
            # stream, so the buffer is not reused before the async copy has finished.
            buf = torch.empty((ids.numel(), w.shape[1]), dtype=w.dtype, pin_memory=True)
            torch.index_select(w, 0, ids, out=buf)
            rows = buf.to(device, non_blocking=True)
        else:
            rows = w.index_select(0, ids.to(w.device)).to(device)
        return rows.detach().requires_grad_(torch.is_grad_enabled())

    def prefetch(self, ids: torch.Tensor, device: torch.device) -> None:
        """Start staging W[ids] (M,) local on ``device`` for the next ``gather`` of ``ids``
        (CUDA + offload: an async copy on a side stream; else a plain gather)."""
        self.staged = stage_rows(self.weight, ids, torch.device(device))

    @torch.no_grad()
    def step_(
        self, ids: torch.Tensor, grad: torch.Tensor, lr: float, seen: torch.Tensor | None = None
    ) -> None:
        """In place on the rows ``ids`` (M,) local only, grad (M, D) on any device:
        ``row_update.sgd_rows`` (lazy: ``g = grad + wd * w;  v = mu * v + g;  w -= lr * v``);
        the rows are marked touched. seen: the rows W[ids] the step computed with (its
        ``gather``, kept by reference for ``snapshot(as_selected=True)``; None: copied here)."""
        weight, momentum = self.weight, self.momentum_buffer
        ids_w = ids.to(weight.device)
        grad = grad.to(weight.device, weight.dtype)  # offload: (M, D) device -> host
        w = weight.index_select(0, ids_w)  # (M, D) copies
        self.before_step = (ids.cpu(), w.clone() if seen is None else seen.detach())
        v = None if self.row_momentum == "immediate" else momentum.index_select(0, ids_w)
        w, v = sgd_rows(w, v, grad, lr, self.mu, self.weight_decay, self.row_norm)
        if v is not None:
            momentum.index_copy_(0, ids_w, v)
        weight.index_copy_(0, ids_w, w)
        self.touched[ids.cpu()] = True
        self.num_updates += 1
        if self.staged is not None:  # staged rows this update moved: gathered again
            refresh_staged(self.staged, weight, ids)

    # -- index support ---------------------------------------------------------------------
    def snapshot(self, as_selected: bool = False) -> np.ndarray:
        """(n, D) float32 CPU copy of W for index building (safe to read from a thread).
        as_selected: the rows the last ``step_`` changed as they were before it, i.e. the rows
        that step's selection saw (the recall probe's truth)."""
        w = self.weight.detach().to("cpu", torch.float32, copy=True)
        if as_selected and self.before_step is not None:
            ids, rows = self.before_step
            w[ids] = rows.to("cpu", torch.float32)
        return w.numpy()

    def pop_touched(self) -> np.ndarray:
        """Sorted local ids updated since the last call (int64); clears the mask."""
        ids = torch.nonzero(self.touched).view(-1).numpy().astype(np.int64)
        self.touched.zero_()
        return ids

    def argmax(self, features: torch.Tensor, head: MarginHead, chunk_size: int):
        """features (B, D) -> (best plain logit (B,), global class id (B,)); ties: lowest id."""
        return argmax_rows(features, self.weight, head, chunk_size, offset=self.start)

    def topk(self, features: torch.Tensor, head: MarginHead, k: int, chunk_size: int):
        """features (B, D) -> (k best plain logits (B, k), global class ids (B, k))."""
        return topk_rows(features, self.weight, head, k, chunk_size, offset=self.start)

    # -- checkpoint ------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        """This range's ``weight``, ``momentum`` (lazy momentum only), ``touched`` (live
        tensors but the mask) and ``num_updates`` (0-d int64)."""
        out = {
            "weight": self.weight.detach(),
            "touched": self.touched.clone(),
            "num_updates": torch.tensor(self.num_updates, dtype=torch.int64),
        }
        if self.row_momentum == "lazy":
            out["momentum"] = self.momentum_buffer.detach()
        return out

    @torch.no_grad()
    def load_full_(
        self, found: Mapping[str, torch.Tensor], num_classes: int, prefix: str, errors: list[str]
    ) -> None:
        """Copy rows [start, end) of the full (N, D) ``weight`` / ``momentum`` (lazy only) and
        (N,) ``touched`` in ``found`` (those present), keeping device and pinning; a tensor of
        the wrong shape goes to ``errors`` naming ``prefix + key``."""
        shape = (num_classes, self.weight.shape[1])
        self.staged = self.before_step = None
        for key, target in (("weight", self.weight), ("momentum", self.momentum_buffer)):
            if key not in found or (key == "momentum" and self.row_momentum != "lazy"):
                continue
            if tuple(found[key].shape) != shape:
                errors.append(
                    f"size mismatch for {prefix}{key}: checkpoint has {tuple(found[key].shape)}, "
                    f"classifier expects {shape} (num_classes, embedding_dim)"
                )
                continue
            target.copy_(found[key][self.start : self.end])
        if "touched" in found and found["touched"].numel() == num_classes:
            self.touched.copy_(found["touched"][self.start : self.end].to(torch.bool))
        if "num_updates" in found:
            self.num_updates = int(found["num_updates"])
