"""The active set of one step and how its parts are drawn.

An ``ActiveSet`` holds exactly M class ids: the batch's unique positives (sorted,
``positives_of``; labels are remapped into 0..M-1 as ``targets``), then the
candidates an index proposed (``rank_major_candidates``), then uniform classes not yet chosen
(``uniform_fill``); ``logq_adjust`` is the sampling correction of the uniform part. The
``Sampler`` (``samplers/base.py``) decides how many of each; these functions only draw them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ActiveSet:
    """ids: (M,) int64 global class ids, positives first, unique.
    targets: (B,) int64 labels remapped into 0..M-1 (``ids[targets] == labels``).
    num_positives: number of unique labels in the batch (``ids[:num_positives]``).
    num_index: how many ids after the positives came from the index (the rest: uniform fill).
    logit_adjust: (M,) float32 added to the training logits (``correction="logq"``), or None.
    """

    ids: torch.Tensor
    targets: torch.Tensor
    num_positives: int
    num_index: int = 0
    logit_adjust: torch.Tensor | None = None

    @property
    def num(self) -> int:
        return int(self.ids.numel())


def positives_of(
    labels: torch.Tensor, num: int, num_classes: int, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """labels (B,) int (any device) -> (positives (P,) int64 sorted unique, targets (B,) int64
    into them), on CPU; ValueError naming sampler ``name`` when M = ``num`` < P or a label is
    outside 0..N-1."""
    labels = labels.detach().to("cpu", torch.int64).view(-1)
    positives, targets = torch.unique(labels, sorted=True, return_inverse=True)
    num_pos = int(positives.numel())
    if num < num_pos:
        raise ValueError(
            f"sampler {name!r}: num (M) = {num} is smaller than the {num_pos} unique "
            f"labels in the batch; raise sampler.num to at least {num_pos}"
        )
    if num_pos and (int(positives[0]) < 0 or int(positives[-1]) >= num_classes):
        raise ValueError(
            f"sampler {name!r}: labels must be in 0..{num_classes - 1}, got "
            f"min {int(positives[0])} max {int(positives[-1])}"
        )
    return positives, targets


def rank_major_candidates(nbrs: np.ndarray, positives: np.ndarray, want: int) -> np.ndarray:
    """nbrs (B, k) neighbour ids per sample, nearest first, -1 where missing; positives (P,)
    sorted unique -> up to ``want`` (<= want,) int64 ids: rank 0 of every sample first, then
    rank 1, ...; deduplicated (first occurrence, i.e. best rank, kept), positives removed, so
    trimming drops the deepest ranks first."""
    cand = np.ascontiguousarray(nbrs.T).reshape(-1)
    cand = cand[cand >= 0]
    _, first = np.unique(cand, return_index=True)
    cand = cand[np.sort(first)]
    cand = cand[~np.isin(cand, positives, assume_unique=True)]
    return cand[:want].astype(np.int64, copy=False)


def uniform_fill(
    num_classes: int, chosen: np.ndarray, count: int, generator: torch.Generator
) -> np.ndarray:
    """``count`` distinct uniform ids from 0..N-1 not in ``chosen`` (distinct) -> (count,).

    Rejection sampling (randint + isin) while the chosen set stays under half of N: cost
    O(count + |chosen|) per step, independent of N. Near-full sets fall back to a
    permutation of the complement, which is O(N) but only happens when N <= 2M.
    """
    if count <= 0:
        return np.empty(0, dtype=np.int64)
    n = num_classes
    if 2 * (chosen.size + count) > n:
        mask = np.ones(n, dtype=bool)
        mask[chosen] = False
        complement = np.flatnonzero(mask)
        perm = torch.randperm(complement.size, generator=generator).numpy()
        return complement[perm[:count]].astype(np.int64, copy=False)
    taken = chosen
    picked: list[np.ndarray] = []
    need = count
    while need > 0:
        draw = torch.randint(n, (2 * need + 16,), generator=generator).numpy()
        _, first = np.unique(draw, return_index=True)
        draw = draw[np.sort(first)]  # distinct, still in random order
        draw = draw[~np.isin(draw, taken, assume_unique=True)][:need]
        picked.append(draw)
        taken = np.concatenate([taken, draw])
        need -= draw.size
    return np.concatenate(picked).astype(np.int64, copy=False)


def logq_adjust(num_classes: int, num_chosen: int, num_fill: int) -> torch.Tensor:
    """(num_chosen + num_fill,) float32: 0 for the positives and index candidates, and
    log((N - num_chosen) / num_fill) for the uniform draws: each stands for that many of the
    classes neither positive nor taken from the index, so the sampled softmax estimates the
    full one."""
    adjust = torch.zeros(num_chosen + num_fill, dtype=torch.float32)
    adjust[num_chosen:] = math.log((num_classes - num_chosen) / num_fill)
    return adjust


CORRECTIONS = ("none", "logq")


def check_selection_knobs(
    name: str, random_fraction: float, index_after: int, correction: str
) -> tuple[float, int, str]:
    """The selection knobs every sampler takes, checked -> (random_fraction, index_after,
    correction).

    random_fraction: share of the M - |P| negatives drawn uniformly at random even when the
    index serves (0: all from the index, 1: like ``random``).
    index_after: selects made like ``random`` before the index is used (its rows are still
    noise early in training).
    correction: ``"logq"`` adds log(n_rest / n_uniform) to the logits of the uniformly drawn
    negatives, so that they stand for all the classes neither positive nor taken from the
    index and the sampled softmax estimates the full one; ``"none"``: plain softmax over the
    M active classes.
    """
    if not 0.0 <= float(random_fraction) <= 1.0:
        raise ValueError(
            f"sampler {name!r}: random_fraction must be in [0, 1], got {random_fraction}"
        )
    if int(index_after) < 0:
        raise ValueError(f"sampler {name!r}: index_after must be >= 0, got {index_after}")
    if correction not in CORRECTIONS:
        raise ValueError(
            f"sampler {name!r}: correction must be one of {CORRECTIONS}, got {correction!r}"
        )
    return float(random_fraction), int(index_after), str(correction)
