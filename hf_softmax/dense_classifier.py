"""DenseClassifier: the honest dense baseline (``sampler=full``), logits over all N classes.

W (N, D) is an ordinary ``nn.Parameter`` trained by the torch optimizer (SGD with momentum
and weight decay in ``HFSoftmaxModule``), exactly as a user would write a plain softmax
classifier; under DDP it is replicated and its gradient all-reduced like any parameter.
``step`` only projects the rows back to ``row_norm`` when one is given (a number:
``classifier.row_norm: auto`` leaves this reference plain). It has the index-facing methods
of ``SampledClassifier`` (``sampler``: a ``FullSampler``, ``snapshot_weights``,
``pop_touched``, ``num``, ``predict``, ``place``) so callbacks need no special case.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hf_softmax.heads import MarginHead
from hf_softmax.output import ClassifierOutput
from hf_softmax.row_search import argmax_rows, topk_rows
from hf_softmax.row_store import initial_rows
from hf_softmax.row_update import project_rows, resolve_row_norm
from hf_softmax.samplers.base import Sampler
from hf_softmax.samplers.full import FullSampler

# keys the sampled classifier (and this one before the redesign) also wrote; dropped on load
_LEGACY_KEYS = ("momentum", "num_updates", "touched", "sampler_rng", "sampler_counters")


class DenseClassifier(nn.Module):
    """N-way softmax classifier, W (N, D) a parameter (``weight``), logits (B, N).

    sampler: None (a ``FullSampler`` is made), a built Sampler over N, or a factory called
    with ``num_classes=, metric=, seed=``; its selection is the identity (all N active).
    weight: initial W (N, D); default as ``SampledClassifier``'s (``row_store.initial_rows``).
    row_norm: None (W free, the plain softmax everyone writes) or r > 0 (cosine heads): every
    row starts at and is projected back to norm r after each optimizer step, the rule of the
    sampled rows (``hf_softmax.row_update``) applied to all N.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        head: MarginHead,
        sampler: Sampler | Callable[..., Sampler] | None = None,
        init_std: float = 0.01,
        seed: int = 0,
        weight: torch.Tensor | None = None,
        row_norm: float | None = None,
    ) -> None:
        super().__init__()
        self.row_norm = resolve_row_norm(row_norm, head.metric)
        self.num_classes, self.embedding_dim = int(num_classes), int(embedding_dim)
        self.head = head
        if sampler is None:
            sampler = FullSampler(num_classes, metric=head.metric, seed=seed)
        elif not isinstance(sampler, Sampler):
            sampler = sampler(num_classes=num_classes, metric=head.metric, seed=seed)
        if sampler.num_classes != num_classes or sampler.metric != head.metric:
            raise ValueError(
                f"dense classifier: sampler {sampler!r} must cover {num_classes} classes with "
                f"the head's metric {head.metric!r}"
            )
        self.sampler = sampler
        if weight is None:
            weight = initial_rows(0, num_classes, num_classes, embedding_dim, init_std, seed)
        elif tuple(weight.shape) != (num_classes, embedding_dim):
            raise ValueError(
                f"dense classifier: weight has shape {tuple(weight.shape)}, expected "
                f"({num_classes}, {embedding_dim}) (num_classes, embedding_dim)"
            )
        if self.row_norm is not None:
            weight = project_rows(weight.detach(), self.row_norm)
        self.weight = nn.Parameter(weight.detach())

    @property
    def metric(self) -> str:
        return self.head.metric

    @property
    def num(self) -> int:
        """M = N: every class is active (setting it, e.g. by a ``num_schedule``, is ignored)."""
        return self.num_classes

    @num.setter
    def num(self, value: int) -> None:
        pass

    def place(self, device: torch.device | str) -> None:
        self.to(device)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> ClassifierOutput:
        """features (B, D), labels (B,) int64 in 0..N-1 -> ClassifierOutput, logits (B, N)."""
        active = self.sampler.select(features.detach(), labels)
        targets = labels.to(features.device, torch.int64).view(-1)
        logits = self.head(features, self.weight, targets)
        with torch.no_grad():
            plain = self.head.plain_logits(features.detach(), self.weight.detach())
            acc = (plain.argmax(dim=1) == targets).float().mean()
        return ClassifierOutput(F.cross_entropy(logits, targets), logits, targets, active, acc)

    @torch.no_grad()
    def step(self, out: ClassifierOutput, lr: float) -> None:
        """After the torch optimizer's step: rows back to ``row_norm`` (else nothing)."""
        if self.row_norm is not None:
            self.weight.copy_(project_rows(self.weight, self.row_norm))

    def nonfinite_rows(self, out: ClassifierOutput) -> list[int]:
        """Up to 10 ids of rows holding NaN/Inf."""
        with torch.no_grad():
            bad = ~torch.isfinite(self.weight).all(dim=1)
        return torch.nonzero(bad).view(-1)[:10].tolist()

    def snapshot_weights(self) -> np.ndarray:
        """(N, D) float32 CPU copy of W."""
        return self.weight.detach().to("cpu", torch.float32, copy=True).numpy()

    def pop_touched(self) -> np.ndarray:
        """Every id: the optimizer moves all rows every step."""
        return np.arange(self.num_classes, dtype=np.int64)

    @torch.no_grad()
    def predict(self, features: torch.Tensor, chunk_size: int = 65536) -> torch.Tensor:
        """features (B, D) -> (B,) int64 argmax over all N classes (plain logits), chunked."""
        return argmax_rows(features, self.weight, self.head, chunk_size)[1]

    @torch.no_grad()
    def topk(self, features: torch.Tensor, k: int, chunk_size: int = 65536) -> torch.Tensor:
        """features (B, D) -> (B, k) int64 ids of the k best plain logits, best first."""
        return topk_rows(features, self.weight, self.head, k, chunk_size)[1]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        legacy = {prefix + k for k in _LEGACY_KEYS}
        rest = {k: v for k, v in state_dict.items() if k not in legacy}
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}"
