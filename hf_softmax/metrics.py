"""Face-verification metrics (the LFW protocol) and backbone cost counters.

Scores are **cosine similarities** of L2-normalised embeddings (a pair is called "same" when
its score is > the threshold). This is equivalent to InsightFace's squared L2 distance of
normalised embeddings: ||a - b||^2 = 2 - 2 cos(a, b), so thresholds convert by d = 2 - 2 t.

- 10-fold accuracy: pairs split into contiguous folds (as sklearn's KFold without shuffling,
  like the LFW/InsightFace tools); for each fold the threshold that maximises accuracy on the
  other nine folds is found exactly (over all midpoints between sorted scores) and applied to
  the held-out fold. `acc`/`acc_std` are the mean/std over folds, `threshold` the mean of the
  ten thresholds.
- TAR@FAR=f: on all pairs, the largest true-accept rate over ROC operating points whose
  false-accept rate is <= f (no interpolation: with fewer than 1/f negative pairs this is the
  TAR at zero false accepts, the conservative reading).
- AUC: area under the ROC of the cosine scores (torchmetrics).

torchmetrics applies a sigmoid to predictions outside [0, 1]; we therefore pass
(cos + 1) / 2, which lies in [0, 1] and is monotone in the cosine, and convert thresholds back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchmetrics.functional.classification import binary_auroc, binary_roc

log = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def cosine_scores(emb1: ArrayLike, emb2: ArrayLike) -> np.ndarray:
    """emb1, emb2: (P, D) -> (P,) float64 cosine similarity of the L2-normalised rows."""
    a, b = _np(emb1).astype(np.float64), _np(emb2).astype(np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"embeddings must both be (P, D); got {a.shape} and {b.shape}")
    a /= np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b /= np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.clip((a * b).sum(axis=1), -1.0, 1.0)


def best_threshold(scores: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """Threshold t maximising accuracy of `score > t` on these pairs -> (t, accuracy).

    Exact: every midpoint between consecutive distinct sorted scores (and one value below the
    minimum / above the maximum) is a candidate; ties go to the lowest such threshold.
    """
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], issame[order].astype(bool)
    n = len(s)
    # cut after position i (i = 0..n): pairs [0, i) are called "different", [i, n) "same"
    diff_below = np.concatenate([[0], np.cumsum(~y)])  # correct "different" calls
    same_above = np.concatenate([np.cumsum(y[::-1])[::-1], [0]])  # correct "same" calls
    correct = diff_below + same_above
    valid = np.ones(n + 1, dtype=bool)
    valid[1:n] = s[1:] > s[:-1]  # a cut between equal scores is not a threshold
    correct = np.where(valid, correct, -1)
    i = int(np.argmax(correct))
    if i == 0:
        t = s[0] - 1e-6
    elif i == n:
        t = s[-1] + 1e-6
    else:
        t = 0.5 * (s[i - 1] + s[i])
    return float(t), float(correct[i] / n)


def kfold_accuracy(
    scores: ArrayLike, issame: ArrayLike, nfolds: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """LFW protocol -> (accuracy per fold (K,), threshold per fold (K,)).

    Folds are contiguous (pairs.bin files interleave/segment folds that way); K is reduced to
    the number of pairs when there are fewer.
    """
    s, y = _np(scores).astype(np.float64), _np(issame).astype(bool)
    if len(s) != len(y) or len(s) < 2:
        raise ValueError(f"need >= 2 scores with one issame each; got {len(s)} and {len(y)}")
    k = min(nfolds, len(s))
    if k < nfolds:
        log.warning("only %d pairs: using %d folds instead of %d", len(s), k, nfolds)
    folds = np.array_split(np.arange(len(s)), k)
    accs, thresholds = np.zeros(k), np.zeros(k)
    for f, test in enumerate(folds):
        train = np.ones(len(s), dtype=bool)
        train[test] = False
        t, _ = best_threshold(s[train], y[train])
        thresholds[f] = t
        accs[f] = np.mean((s[test] > t) == y[test])
    return accs, thresholds


def roc_curve(scores: ArrayLike, issame: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of cosine scores -> (fpr, tpr, thresholds), thresholds in cosine units, decreasing.

    A pair is accepted when its score >= threshold (torchmetrics' convention).
    """
    s = torch.as_tensor(_np(scores), dtype=torch.float64)
    y = torch.as_tensor(_np(issame).astype(np.int64))
    probs = ((s + 1.0) / 2.0).clamp(0.0, 1.0)  # in [0, 1]: no automatic sigmoid
    fpr, tpr, thr = binary_roc(probs, y)
    return fpr.numpy(), tpr.numpy(), (thr.numpy() * 2.0 - 1.0)


def tar_at_far(scores: ArrayLike, issame: ArrayLike, far: float) -> float:
    """Largest TAR among ROC points with FAR <= far (see module docstring)."""
    fpr, tpr, _ = roc_curve(scores, issame)
    ok = fpr <= far + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def auc(scores: ArrayLike, issame: ArrayLike) -> float:
    s = torch.as_tensor(_np(scores), dtype=torch.float64)
    y = torch.as_tensor(_np(issame).astype(np.int64))
    return float(binary_auroc(((s + 1.0) / 2.0).clamp(0.0, 1.0), y))


def far_key(far: float) -> str:
    """1e-3 -> "tar@far=1e-3" (the contract's key spelling), 0.15 -> "tar@far=1.5e-1"."""
    mantissa, exponent = f"{far:e}".split("e")
    return f"tar@far={mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def verification_metrics(
    emb1: ArrayLike,
    emb2: ArrayLike,
    issame: ArrayLike,
    nfolds: int = 10,
    fars: tuple[float, ...] = (1e-3, 1e-4),
) -> dict[str, float]:
    """emb1, emb2: (P, D) embeddings of the pairs; issame: (P,) bool.

    -> {"acc", "acc_std", "threshold", "tar@far=1e-3", "tar@far=1e-4", "auc"} (one key per far),
    threshold in cosine-similarity units (see module docstring).
    """
    scores = cosine_scores(emb1, emb2)
    y = _np(issame).astype(bool)
    if len(y) != len(scores):
        raise ValueError(f"issame has {len(y)} entries for {len(scores)} pairs")
    accs, thresholds = kfold_accuracy(scores, y, nfolds)
    out = {
        "acc": float(accs.mean()),
        "acc_std": float(accs.std()),
        "threshold": float(thresholds.mean()),
    }
    for far in fars:
        out[far_key(far)] = tar_at_far(scores, y, far) if y.any() and (~y).any() else 0.0
    out["auc"] = auc(scores, y) if y.any() and (~y).any() else float("nan")
    return out


@dataclass(frozen=True)
class ModelCost:
    """Parameters and multiply-accumulates of one forward pass of one image."""

    params: int
    macs: int

    @property
    def flops(self) -> int:
        """2 x MACs. (Face papers often quote MACs as "FLOPs": iresnet50 "6.3 G" is MACs.)"""
        return 2 * self.macs

    def __str__(self) -> str:
        return (
            f"params {self.params / 1e6:.3f} M, {self.macs / 1e9:.3f} GMACs "
            f"({self.flops / 1e9:.3f} GFLOPs)"
        )


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def model_cost(model: nn.Module, input_size: int | tuple[int, int] = 112) -> ModelCost:
    """Count conv and linear MACs for one (1, C, H, W) image with forward hooks.

    C is the model's ``in_channels`` attribute (3 without one).

    Conv: out elements x (cin / groups) x kh x kw; linear: in x out. BN, activations, pooling
    and additions are not counted (they are < 1% for these backbones).
    """
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    macs = 0

    def hook(mod: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            macs += (out.numel() // out.shape[0]) * (mod.in_channels // mod.groups) * kh * kw
        else:
            rows = out.numel() // out.shape[-1] // out.shape[0]  # 1 for (B, out) outputs
            macs += rows * mod.in_features * mod.out_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        channels = int(getattr(model, "in_channels", 3))
        model(torch.zeros(1, channels, h, w, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return ModelCost(params=count_params(model), macs=macs)
