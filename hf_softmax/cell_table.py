"""The class-neighbour table from random-projection cells instead of N index queries.

``sampler.table_trees = T > 0`` (label mode): each class's ``table_k`` nearest other rows among
the rows that share a cell with it in any of T balanced random-projection trees. A tree splits
every cell at the median of its rows' projections on the difference of two of its rows (as
annoy splits) until cells hold at most ``CELL_ROWS`` rows; inside a cell one Gram matrix scores
every pair exactly (BLAS), and the trees' candidates are merged by score. No index is queried:
at 10^6 x 256 on 2 cores (shuffled family rows), 4 trees took 67 s for recall@16 0.31 against
the exact top-16, where annoy's table (N queries by item id after its 49 s build) took 104 s
for 0.21 (``python -m bench.table_cost``; docs/benchmarks.md, "Class table from projection
cells").
"""

from __future__ import annotations

import time

import numpy as np
import torch

CELL_ROWS = 512  # a cell's most rows: its Gram matrix is CELL_ROWS^2 scores
_CHUNK = 1 << 14  # rows projected per numpy call; the GIL is handed over between calls


def projection_cells(
    rows: np.ndarray, seed: int, cell_rows: int = CELL_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """rows (N, D) -> (order, bounds): the rows of cell c are ``order[bounds[c]:bounds[c+1]]``;
    cells hold between cell_rows / 2 and cell_rows rows (N > cell_rows), near rows together."""
    n = rows.shape[0]
    depth = max(0, int(np.ceil(np.log2(max(n, 1) / cell_rows))))
    rng = np.random.default_rng(seed)
    cell = np.zeros(n, np.int64)
    proj = np.empty(n, np.float32)
    for level in range(depth):
        cells = 1 << level
        members = np.argsort(cell, kind="stable")
        starts = np.searchsorted(cell[members], np.arange(cells))
        sizes = np.maximum(np.bincount(cell, minlength=cells), 1)
        pick = [members[starts + (rng.random(cells) * sizes).astype(np.int64)] for _ in "ab"]
        dirs = rows[pick[0]] - rows[pick[1]]  # (cells, D)
        for start in range(0, n, _CHUNK):
            stop = min(n, start + _CHUNK)
            proj[start:stop] = np.einsum("ij,ij->i", rows[start:stop], dirs[cell[start:stop]])
            time.sleep(0)  # a training thread waiting for the GIL gets it (thread builds)
        cell = _halve(cell, proj)
    order = np.argsort(cell, kind="stable")
    sorted_cells = cell[order]
    bounds = np.r_[0, np.flatnonzero(np.diff(sorted_cells)) + 1, n]
    return order, bounds


def _halve(cell: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """Split every cell at the median of its rows' ``proj``: cell c -> 2c (lower half), 2c + 1.
    One argsort of cell + proj scaled into [0, 1) (``np.lexsort`` was 8x slower and held the
    GIL for ~20 ms at a time at 10^6 rows)."""
    n = cell.shape[0]
    low, span = float(proj.min()), float(proj.max() - proj.min())
    scale = 1.0 / (span * (1 + 1e-6)) if span > 0 else 0.0
    by = np.argsort(cell + (proj.astype(np.float64) - low) * scale)
    sorted_cells = cell[by]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_cells)) + 1]
    sizes = np.diff(np.r_[starts, n])
    rank = np.arange(n) - np.repeat(starts, sizes)
    out = np.empty_like(cell)
    out[by] = sorted_cells * 2 + (rank >= np.repeat(sizes // 2, sizes))
    return out


def cell_table(
    rows: np.ndarray,
    k: int,
    trees: int,
    seed: int = 0,
    metric: str = "ip",
    cell_rows: int = CELL_ROWS,
) -> np.ndarray:
    """rows (N, D) -> (N, k) int32: each row's k best other rows (inner product, or cosine)
    among those sharing a cell with it in ``trees`` trees, best first, -1 padded."""
    n = rows.shape[0]
    k = max(0, min(int(k), n - 1))
    ids = np.full((n, k), -1, np.int64)
    scores = np.full((n, k), -np.inf, np.float32)
    if k == 0:
        return ids.astype(np.int32)
    vectors = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
    if metric == "cosine":
        vectors = torch.nn.functional.normalize(vectors, dim=1)
    for tree in range(trees):
        order, bounds = projection_cells(vectors.numpy(), seed + tree, cell_rows)
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            members = order[start:stop]
            block = vectors[torch.from_numpy(members)]
            gram = block @ block.T
            gram.fill_diagonal_(-float("inf"))  # never its own neighbour
            best, at = torch.topk(gram, min(k, len(members) - 1), dim=1)
            ids[members], scores[members] = _merge(
                ids[members], scores[members], members[at.numpy()], best.numpy(), k
            )
    return np.where(np.isfinite(scores), ids, -1).astype(np.int32)


def _merge(
    ids: np.ndarray, scores: np.ndarray, new_ids: np.ndarray, new_scores: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best of two candidate lists (an id found twice counted once)."""
    cand = np.concatenate([ids, new_ids], axis=1)
    score = np.concatenate([scores, new_scores], axis=1)
    by_id = np.argsort(cand, axis=1, kind="stable")
    cand, score = np.take_along_axis(cand, by_id, 1), np.take_along_axis(score, by_id, 1)
    repeat = np.zeros_like(cand, dtype=bool)
    repeat[:, 1:] = (cand[:, 1:] == cand[:, :-1]) & (cand[:, 1:] >= 0)
    score[repeat] = -np.inf
    top = np.argsort(-score, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cand, top, 1), np.take_along_axis(score, top, 1)
