"""The sampled classifier: W (N, D) outside autograd, a softmax over M active rows per step.

Per step (``forward`` then ``sparse_step``):

1. ``sampler.select`` picks the active set A (|A| = M, unique positives first) and remaps the
   labels into 0..M-1;
2. W[A] (M, D) is gathered to the compute device — from pinned host memory with a
   non-blocking copy when ``offload`` is on, so accelerator memory is O(M * D), not O(N * D);
3. the head gives logits (B, M) with its margin, cross-entropy over the remapped labels;
4. backward fills the gradient of the features and of the leaf W[A];
5. ``sparse_step(lr)`` applies SGD with momentum and weight decay to the rows A only:
   ``g = grad + wd * w;  v[A] = mu * v[A] + g;  W[A] = w - lr * v[A]`` — exactly what
   ``torch.optim.SGD(momentum=mu, dampening=0, weight_decay=wd)`` does to those rows.

Lazy updates: rows not in A get nothing that step — no weight decay and no momentum
movement (a dense SGD would still shrink them by ``lr * wd * w`` and move them by their
momentum). Their decay and remaining momentum are simply skipped, not deferred; this is
the per-row parameter-server semantics of the original HF-Softmax. Only rows that were
selected at least once ever move.

With ``sampler.dense`` (the ``full`` sampler) none of this applies: W is an ordinary
``nn.Parameter`` trained by the torch optimizer and the logits cover all N classes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hf_softmax import rows as row_store
from hf_softmax.heads import MarginHead
from hf_softmax.samplers.base import ActiveSet, Sampler

log = logging.getLogger(__name__)

_EXTRA_KEYS = ("num_updates", "touched", "sampler_rng", "sampler_counters")


@dataclass
class HeadOutput:
    """loss: scalar; logits: (B, M) with the head's margin; targets: (B,) int64 in 0..M-1 on
    the logits' device; active: the ActiveSet (ids on CPU); rows: the gathered W[A] (M, D)
    leaf whose ``.grad`` backward fills (None in dense mode or without grad).
    accuracy: top-1 within the active set on the PLAIN logits (no margin: under CosFace or
    ArcFace the margin logits rarely rank the target first), scalar, no grad."""

    loss: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor
    active: ActiveSet
    rows: torch.Tensor | None = None
    accuracy: torch.Tensor | None = None


@torch.no_grad()
def plain_top1(
    head: MarginHead, features: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """features (B, D), rows (M, D), targets (B,) in 0..M-1 -> share of argmax == target, scalar.

    The head's plain logits (no margin), recomputed: one extra (B, M) product without grad.
    """
    if targets.numel() == 0:
        return features.new_zeros(())
    logits = head.plain_logits(features.detach(), rows.detach())
    return (logits.argmax(dim=1) == targets).float().mean()


class SampledClassifier(nn.Module):
    """N-way classifier whose rows live outside autograd and are updated sparsely.

    W: (N, D) float32 and its momentum (N, D), plain tensors (not parameters or buffers),
    saved in the state dict as ``weight`` and ``momentum`` with the update counter, the
    touched-row mask and the sampler's RNG. ``offload``: W stays in host memory (pinned when
    the compute device is CUDA); ``module.to(device)`` never moves it. Without offload,
    ``module.to(device)`` (and ``place``) moves W and momentum with the module.
    ``weight``: initial W (N, D) float32, used in place on its device (e.g. generated on the
    GPU or in pinned memory for a 10^7-class benchmark); default N(0, ``init_std``) from ``seed``.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        sampler: Sampler,
        head: MarginHead,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        offload: bool = False,
        init_std: float = 0.01,
        seed: int = 0,
        weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if sampler.num_classes != num_classes:
            raise ValueError(
                f"classifier: sampler has num_classes={sampler.num_classes}, expected {num_classes}"
            )
        if sampler.metric != head.metric:
            raise ValueError(
                f"classifier: sampler metric {sampler.metric!r} does not match head "
                f"{type(head).__name__} metric {head.metric!r}"
            )
        if offload and sampler.dense:
            raise ValueError("classifier: offload needs a sampled (non-dense) sampler, got 'full'")
        self.num_classes = int(num_classes)
        self.embedding_dim = int(embedding_dim)
        self.sampler = sampler
        self.head = head
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.offload = bool(offload)
        self.dense = bool(sampler.dense)
        if weight is None:
            gen = torch.Generator().manual_seed(seed)
            w = torch.empty(num_classes, embedding_dim).normal_(0.0, init_std, generator=gen)
        elif tuple(weight.shape) != (num_classes, embedding_dim):
            raise ValueError(
                f"classifier: weight has shape {tuple(weight.shape)}, expected "
                f"({num_classes}, {embedding_dim}) (num_classes, embedding_dim)"
            )
        else:
            w = weight.detach()  # used as is (no copy): its device and pinning are kept
        if self.dense:
            self.weight = nn.Parameter(w)
            self.momentum_buffer: torch.Tensor | None = None
        else:
            self.weight = w  # plain attribute: outside autograd, parameters() and buffers()
            # same place as W; pinned with a pinned W, so offload needs no second copy
            self.momentum_buffer = torch.zeros(
                w.shape, dtype=w.dtype, device=w.device, pin_memory=w.is_pinned()
            )
        self._touched = torch.zeros(num_classes, dtype=torch.bool)
        self.num_updates = 0
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def metric(self) -> str:
        return self.head.metric

    @property
    def num(self) -> int:
        """M, active classes per step (the sampler's; ShardedClassifier has the same knob)."""
        return self.sampler.num

    @num.setter
    def num(self, value: int) -> None:
        self.sampler.num = value

    # -- placement -------------------------------------------------------------------------
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        super()._apply(fn, recurse)
        if not self.dense and not self.offload:
            self.weight = fn(self.weight)
            self.momentum_buffer = fn(self.momentum_buffer)
        return self

    def place(self, device: torch.device | str) -> None:
        """Put W where it should live for compute on ``device``.

        Non-offload: W and momentum move to ``device``. Offload: they stay in host memory,
        pinned when ``device`` is CUDA so the per-step gathers can copy asynchronously.
        """
        device = torch.device(device)
        if self.dense or not self.offload:
            self.to(device)
            return
        self.weight, self.momentum_buffer = row_store.place_rows(
            self.weight, self.momentum_buffer, device, offload=True
        )
        self.head.to(device)

    # -- training --------------------------------------------------------------------------
    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        """features (B, D), labels (B,) int64 in 0..N-1 -> HeadOutput (logits (B, M))."""
        active = self.sampler.select(features.detach(), labels)
        if self.dense:
            targets = labels.to(features.device)
            logits = self.head(features, self.weight, targets)
            acc = plain_top1(self.head, features, self.weight, targets)
            return HeadOutput(F.cross_entropy(logits, targets), logits, targets, active, None, acc)
        leaf = row_store.gather_leaf(self.weight, active.ids, features.device)
        track = leaf.requires_grad
        targets = active.targets.to(features.device, non_blocking=True)
        logits = self.head(features, leaf, targets)
        if active.logit_adjust is not None:  # sampling correction (loss only; see Sampler)
            logits = logits + active.logit_adjust.to(logits.device, logits.dtype)
        loss = F.cross_entropy(logits, targets)
        self._pending = (active.ids, leaf) if track else None
        acc = plain_top1(self.head, features, leaf, targets)
        return HeadOutput(loss, logits, targets, active, leaf if track else None, acc)

    @torch.no_grad()
    def sparse_step(self, lr: float) -> None:
        """After backward: SGD with momentum + weight decay on the active rows only (lazy).

        No-op in dense mode (the torch optimizer owns W) or when the last forward kept no
        gradient. Call once per forward, with the learning rate of the current schedule.
        """
        if self.dense:
            return
        pending, self._pending = self._pending, None
        w, v, touched = self.weight, self.momentum_buffer, self._touched
        if row_store.step_pending_(pending, w, v, touched, lr, self.momentum, self.weight_decay):
            self.num_updates += 1

    # -- index support ---------------------------------------------------------------------
    def snapshot_weights(self) -> np.ndarray:
        """(N, D) float32 CPU copy of W for index building (safe to read from a thread)."""
        return row_store.snapshot_rows(self.weight)

    def pop_touched(self) -> np.ndarray:
        """Sorted class ids updated since the last call (for an hnsw refresh); resets the mask."""
        if self.dense:
            return np.arange(self.num_classes, dtype=np.int64)
        return row_store.pop_touched(self._touched)

    @torch.no_grad()
    def predict(self, features: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
        """features (B, D) -> (B,) int64 argmax over all N classes (plain logits), chunked."""
        return row_store.argmax_rows(features, self.weight, self.head, chunk_size)[1]

    # -- checkpoint ------------------------------------------------------------------------
    def _own_keys(self) -> tuple[str, ...]:
        return _EXTRA_KEYS if self.dense else ("weight", "momentum", *_EXTRA_KEYS)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # dense: the weight Parameter
        if not self.dense:
            destination[prefix + "weight"] = self.weight.detach()
            destination[prefix + "momentum"] = self.momentum_buffer.detach()
        s = self.sampler.state_dict()
        destination[prefix + "num_updates"] = torch.tensor(self.num_updates, dtype=torch.int64)
        destination[prefix + "touched"] = self._touched.clone()
        destination[prefix + "sampler_rng"] = s["rng"].clone()
        destination[prefix + "sampler_counters"] = torch.tensor(
            [s["num"], s["num_selects"], s["num_fallbacks"], s["num_swaps"]], dtype=torch.int64
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        own, found = row_store.pick_state(
            state_dict, prefix, self._own_keys(), strict, missing_keys
        )
        row_store.load_rows_(
            {"weight": self.weight, "momentum": self.momentum_buffer},
            found,
            (self.num_classes, self.embedding_dim),
            slice(None),
            prefix,
            "classifier expects",
            error_msgs,
        )
        if "num_updates" in found:
            self.num_updates = int(found["num_updates"])
        if "touched" in found and found["touched"].numel() == self.num_classes:
            self._touched.copy_(found["touched"].to(torch.bool))
        if "sampler_rng" in found and "sampler_counters" in found:
            num, selects, fallbacks, swaps = (int(x) for x in found["sampler_counters"])
            self.sampler.load_state_dict(
                {
                    "rng": found["sampler_rng"],
                    "num": num if not self.dense else self.num_classes,
                    "num_selects": selects,
                    "num_fallbacks": fallbacks,
                    "num_swaps": swaps,
                }
            )
        rest = {k: v for k, v in state_dict.items() if k not in own}
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
            f"sampler={self.sampler!r}, offload={self.offload}, dense={self.dense}"
        )
