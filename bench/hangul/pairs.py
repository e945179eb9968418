"""Verification pairs over the held-out faces: random negatives and look-alike negatives.

Test images are indexed ``(class position, test face)``. Every pair takes its two images
from two *different* held-out faces, positives and negatives alike, so a pair's label cannot
be read off the style. A negative's second syllable is either uniform over the other classes
(``pairs.bin``) or the class's look-alike (``pairs_lookalike.bin``): its nearest neighbour by
L2 distance between plain (un-jittered) 32x32 renders in the reference faces, concatenated.
"""

from __future__ import annotations

import numpy as np


def nearest_neighbours(renders: np.ndarray, block: int = 1024) -> np.ndarray:
    """``renders: (K, D)`` -> ``(K,)`` int64 index of each row's nearest other row (L2)."""
    x = renders.astype(np.float32)
    sq = (x * x).sum(1)
    nn = np.empty(len(x), np.int64)
    for a in range(0, len(x), block):
        d = sq[a : a + block, None] + sq[None, :] - 2.0 * (x[a : a + block] @ x.T)
        d[np.arange(len(d)), np.arange(a, a + len(d))] = np.inf  # not itself
        nn[a : a + block] = d.argmin(1)
    return nn


def make_pairs(
    rng: np.random.Generator,
    num_classes: int,
    num_faces: int,
    num_pairs: int,
    neighbour: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(pairs (P, 2, 2) int64 of (class position, face), issame (P,) bool)``, shuffled.

    Half positives (same class, two faces); negatives pair a class with ``neighbour[class]``
    when given, else with a uniformly drawn other class.
    """
    if num_faces < 2 or num_classes < 2:
        raise ValueError(
            f"pairs need >= 2 test faces and >= 2 classes, got {num_faces} and {num_classes}"
        )
    n_pos = num_pairs // 2
    n_neg = num_pairs - n_pos
    faces = np.stack([rng.permutation(num_faces)[:2] for _ in range(num_pairs)])  # (P, 2)
    a = rng.integers(0, num_classes, num_pairs)
    b = a.copy()
    if neighbour is not None:
        b[n_pos:] = neighbour[a[n_pos:]]
    else:
        b[n_pos:] = (a[n_pos:] + rng.integers(1, num_classes, n_neg)) % num_classes
    pairs = np.stack([np.stack([a, faces[:, 0]], 1), np.stack([b, faces[:, 1]], 1)], 1)
    issame = np.arange(num_pairs) < n_pos
    order = rng.permutation(num_pairs)
    return pairs[order], issame[order]
