"""Synthetic classifier rows and features with realistic neighbour structure.

Rows come in families of near neighbours (hard negatives exist), features sit near their
class rows: what the head-step, index-cost and accuracy benchmarks train and query on.
"""

from __future__ import annotations

import math

import numpy as np


def family_rows(
    num_classes: int,
    dim: int,
    family_size: int = 10,
    spread: float = 0.35,
    seed: int = 0,
    scale: float = 1.0,
    chunk: int = 1 << 18,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Class vectors in families of near neighbours: (N, D) float32 rows of norm ``scale``.

    Row i belongs to family ``i // family_size``; its vector is the family centre (unit norm)
    plus ``spread`` times a unit-norm private offset, renormalised. This gives the index and
    the samplers realistic structure (hard negatives exist) instead of isotropic noise.
    Generated in chunks (families never straddle chunks), optionally into ``out``, so
    N = 10^7 does not need a second copy.
    """
    chunk = max(family_size, chunk - chunk % family_size)
    rows = out if out is not None else np.empty((num_classes, dim), dtype=np.float32)
    for start in range(0, num_classes, chunk):
        stop = min(num_classes, start + chunk)
        rng = np.random.default_rng((seed, start))
        nfam = math.ceil((stop - start) / family_size)
        centres = rng.standard_normal((nfam, dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        offs = rng.standard_normal((stop - start, dim), dtype=np.float32)
        offs /= np.linalg.norm(offs, axis=1, keepdims=True)
        block = centres[np.arange(stop - start) // family_size] + spread * offs
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        rows[start:stop] = block * scale
    return rows


def features_near(
    rows: np.ndarray, labels: np.ndarray, noise: float, rng: np.random.Generator
) -> np.ndarray:
    """Features (B, D) float32 near the (unit-normalised) rows of their labels plus noise."""
    centres = rows[labels].astype(np.float32, copy=True)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True) + 1e-12
    return centres + noise / math.sqrt(rows.shape[1]) * rng.standard_normal(
        centres.shape, dtype=np.float32
    )
