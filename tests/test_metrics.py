"""Verification metrics against hand-computed cases and a slow brute-force reference."""

import numpy as np
import pytest
import torch

from hf_softmax.metrics import (
    best_threshold,
    cosine_scores,
    kfold_accuracy,
    roc_curve,
    tar_at_far,
    verification_metrics,
)


def pairs_from_scores(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2-D unit embeddings whose cosine is exactly `scores`: e1 = (1, 0), e2 = (s, sqrt(1-s^2))."""
    s = np.asarray(scores, dtype=np.float64)
    e1 = np.stack([np.ones_like(s), np.zeros_like(s)], 1)
    e2 = np.stack([s, np.sqrt(1 - s**2)], 1)
    return e1, e2


def brute_best_threshold(scores: np.ndarray, issame: np.ndarray) -> float:
    """Slow oracle: best accuracy of `score > t` over every score, midpoint and both ends."""
    s = np.sort(scores)
    candidates = np.concatenate([s, (s[1:] + s[:-1]) / 2, [s[0] - 1, s[-1] + 1]])
    return max(np.mean((scores > t) == issame) for t in candidates)


def test_cosine_scores_normalise() -> None:
    a = np.array([[3.0, 0.0], [1.0, 1.0]])
    b = np.array([[5.0, 0.0], [-2.0, -2.0]])
    np.testing.assert_allclose(cosine_scores(a, b), [1.0, -1.0])
    with pytest.raises(ValueError, match="embeddings"):
        cosine_scores(a, b[:1])


def test_perfectly_separable() -> None:
    rng = np.random.default_rng(0)
    issame = np.arange(200) % 2 == 0
    scores = np.where(issame, rng.uniform(0.5, 0.9, 200), rng.uniform(-0.3, 0.3, 200))
    m = verification_metrics(*pairs_from_scores(scores), issame)
    assert m["acc"] == 1.0 and m["acc_std"] == 0.0
    assert m["auc"] == pytest.approx(1.0)
    assert m["tar@far=1e-3"] == 1.0 and m["tar@far=1e-4"] == 1.0
    assert 0.3 - 1e-6 <= m["threshold"] <= 0.5 + 1e-6


def test_random_embeddings_near_chance() -> None:
    g = torch.Generator().manual_seed(0)
    e1, e2 = torch.randn(3000, 64, generator=g), torch.randn(3000, 64, generator=g)
    issame = torch.rand(3000, generator=g) < 0.5
    m = verification_metrics(e1, e2, issame)
    assert abs(m["acc"] - 0.5) < 0.05
    assert abs(m["auc"] - 0.5) < 0.05
    assert m["tar@far=1e-3"] < 0.05


def test_known_threshold_by_hand() -> None:
    # sorted: 0.1 d, 0.2 d, 0.3 s, 0.4 d, 0.6 s, 0.7 s. Cuts (score > t):
    # t<0.1: 3/6; 0.15: 4/6; 0.25: 5/6; 0.35: 4/6; 0.5: 5/6; 0.65: 4/6; >0.7: 3/6
    # -> best accuracy 5/6, first best cut midpoint(0.2, 0.3) = 0.25.
    scores = np.array([0.3, 0.1, 0.6, 0.4, 0.7, 0.2])
    issame = np.array([True, False, True, False, True, False])
    t, acc = best_threshold(scores, issame)
    assert t == pytest.approx(0.25) and acc == pytest.approx(5 / 6)
    # 2 folds: [0.3 s, 0.1 d, 0.6 s] / [0.4 d, 0.7 s, 0.2 d]
    # train on fold 2 -> t = mid(0.4, 0.7) = 0.55, test fold 1: 0.3 s wrong -> 2/3
    # train on fold 1 -> t = mid(0.1, 0.3) = 0.2, test fold 2: 0.4 d wrong, 0.2 d right -> 2/3
    accs, thresholds = kfold_accuracy(scores, issame, nfolds=2)
    np.testing.assert_allclose(thresholds, [0.55, 0.2])
    np.testing.assert_allclose(accs, [2 / 3, 2 / 3])
    m = verification_metrics(*pairs_from_scores(scores), issame, nfolds=2)
    assert m["acc"] == pytest.approx(2 / 3) and m["threshold"] == pytest.approx(0.375)


def test_best_threshold_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = int(rng.integers(2, 40))
        scores = np.round(rng.uniform(-1, 1, n), 2)  # ties included
        issame = rng.random(n) < 0.5
        t, acc = best_threshold(scores, issame)
        assert acc == pytest.approx(np.mean((scores > t) == issame))
        assert acc == pytest.approx(brute_best_threshold(scores, issame))


def test_tar_at_far_by_hand() -> None:
    # 10 negatives: FAR steps of 0.1. 4 positives.
    neg = np.array([0.9, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2, -0.3])
    pos = np.array([0.95, 0.85, 0.6, 0.45])
    scores = np.concatenate([pos, neg])
    issame = np.r_[np.ones(4, bool), np.zeros(10, bool)]
    # FAR 0 -> accept only > 0.9: TAR 1/4; FAR 0.1 (accept >= 0.9 ... >0.5): 3/4;
    # FAR 0.2 (accept >= 0.5): 4/4
    assert tar_at_far(scores, issame, 1e-3) == pytest.approx(0.25)
    assert tar_at_far(scores, issame, 0.1) == pytest.approx(0.75)
    assert tar_at_far(scores, issame, 0.15) == pytest.approx(0.75)
    assert tar_at_far(scores, issame, 0.2) == pytest.approx(1.0)
    m = verification_metrics(*pairs_from_scores(scores), issame, nfolds=2, fars=(1e-3, 0.1))
    assert m["tar@far=1e-3"] == pytest.approx(0.25) and m["tar@far=1e-1"] == pytest.approx(0.75)
    assert set(verification_metrics(*pairs_from_scores(scores), issame)) == {
        "acc",
        "acc_std",
        "threshold",
        "tar@far=1e-3",
        "tar@far=1e-4",
        "auc",
    }


def test_roc_thresholds_in_cosine_units_without_sigmoid() -> None:
    scores = np.array([-0.8, -0.2, 0.4, 0.9])
    issame = np.array([False, True, False, True])
    fpr, tpr, thr = roc_curve(scores, issame)
    assert fpr[0] == 0 and tpr[-1] == 1 and fpr[-1] == 1
    # thresholds come back as the cosine scores themselves (after the leading "accept none")
    np.testing.assert_allclose(np.sort(thr[1:]), np.sort(scores), atol=1e-6)
    m = verification_metrics(*pairs_from_scores(scores), issame, nfolds=2)
    # AUC by hand: positive/negative pairs ordered correctly: (-0.2>-0.8), (0.9>-0.8), (0.9>0.4)
    assert m["auc"] == pytest.approx(3 / 4)
