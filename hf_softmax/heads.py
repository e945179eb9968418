"""Margin heads: logits of features against a (sub)set of classifier rows.

A head is stateless: ``forward(features (B, D), weight (M, D), targets (B,)) -> logits (B, M)``
with the margin applied at ``targets`` (indices into the M rows), and ``plain_logits`` without
the margin (prediction, top-1). ``metric`` tells the samplers which nearest-neighbour metric
matches the head: ``"ip"`` (inner product) for the linear head, ``"cosine"`` for CosFace and
ArcFace, which normalise features and rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HEADS", "ArcFaceHead", "CosFaceHead", "LinearHead", "MarginHead", "build_head"]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 stays float64; half precision is promoted to float32 for a stable softmax."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class MarginHead(nn.Module):
    """Base class. Subclasses set ``metric`` and implement ``plain_logits`` and ``forward``."""

    metric: str = "ip"

    def __init__(self, scale: float = 1.0, margin: float = 0.0) -> None:
        super().__init__()
        self.scale = float(scale)
        self.margin = float(margin)

    def plain_logits(self, features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """features (B, D), weight (M, D) -> logits (B, M) without margin."""
        raise NotImplementedError

    def forward(
        self, features: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """features (B, D), weight (M, D), targets (B,) int64 in 0..M-1 -> logits (B, M)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"scale={self.scale}, margin={self.margin}, metric={self.metric!r}"


class LinearHead(MarginHead):
    """Plain softmax logits ``scale * f @ W^T`` (scale 1 by default); no margin."""

    metric = "ip"

    def __init__(self, scale: float = 1.0, margin: float = 0.0) -> None:
        if margin != 0.0:
            raise ValueError(f"head 'linear': margin must be 0.0, got {margin}")
        super().__init__(scale, margin)

    def plain_logits(self, features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(features, weight)
        logits = features.to(dtype) @ weight.to(dtype).t()
        return logits if self.scale == 1.0 else logits * self.scale

    def forward(
        self, features: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        return self.plain_logits(features, weight)


class _CosineHead(MarginHead):
    metric = "cosine"

    def cosine(self, features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(B, D), (M, D) -> cos (B, M) between features and rows, both L2-normalised."""
        dtype = _compute_dtype(features, weight)
        return F.normalize(features.to(dtype), dim=1) @ F.normalize(weight.to(dtype), dim=1).t()

    def plain_logits(self, features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.scale * self.cosine(features, weight)

    def target_logit(self, cos_t: torch.Tensor) -> torch.Tensor:
        """cos (B,) at the targets -> margin-adjusted cos (B,)."""
        raise NotImplementedError

    def forward(
        self, features: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        cos = self.cosine(features, weight)
        targets = targets.view(-1, 1)
        cos_t = cos.gather(1, targets)  # only B values get the margin
        cos = cos.scatter(1, targets, self.target_logit(cos_t))
        return self.scale * cos


class CosFaceHead(_CosineHead):
    """CosFace / LMCL (Wang et al. 2018): ``s * (cos - m)`` at the target, ``s * cos`` elsewhere."""

    def __init__(self, scale: float = 64.0, margin: float = 0.4) -> None:
        super().__init__(scale, margin)

    def target_logit(self, cos_t: torch.Tensor) -> torch.Tensor:
        return cos_t - self.margin


class ArcFaceHead(_CosineHead):
    """ArcFace (Deng et al. 2019): ``s * cos(theta + m)`` at the target.

    ``cos(theta + m)`` is not monotonic once ``theta + m > pi``; as in InsightFace, for
    ``theta > pi - m`` the target logit becomes ``cos(theta) - m * sin(m)`` (keeps it
    decreasing in theta). With ``easy_margin`` the margin applies only where ``cos > 0``.
    """

    def __init__(self, scale: float = 64.0, margin: float = 0.5, easy_margin: bool = False):
        super().__init__(scale, margin)
        self.easy_margin = bool(easy_margin)
        self.cos_m = math.cos(margin)
        self.sin_m = math.sin(margin)
        self.threshold = math.cos(math.pi - margin)
        self.mm = math.sin(math.pi - margin) * margin

    def target_logit(self, cos_t: torch.Tensor) -> torch.Tensor:
        # clamp keeps sqrt differentiable at |cos| = 1
        sin_t = torch.sqrt((1.0 - cos_t * cos_t).clamp(min=1e-12))
        phi = cos_t * self.cos_m - sin_t * self.sin_m  # cos(theta + m)
        if self.easy_margin:
            return torch.where(cos_t > 0, phi, cos_t)
        return torch.where(cos_t > self.threshold, phi, cos_t - self.mm)


HEADS: dict[str, type[MarginHead]] = {
    "linear": LinearHead,
    "cosface": CosFaceHead,
    "arcface": ArcFaceHead,
}


def build_head(name: str, **kwargs) -> MarginHead:
    """Build a head by registry name with config kwargs (``scale``, ``margin``, ...)."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; valid names: {sorted(HEADS)}")
    return HEADS[name](**kwargs)
