"""The class table from random-projection cells (``sampler.table_trees``): against a dense
exact top-k, and served through a real build worker like the index's own table."""

import numpy as np
import pytest
import torch

from bench.synthetic import family_rows
from hf_softmax.cell_table import cell_table, projection_cells
from hf_softmax.index_maintainer import IndexMaintainer
from hf_softmax.samplers.exact import recall_at_k
from tests.test_index_maintainer import B, D, M, make, train


def exact_table(rows: np.ndarray, k: int, metric: str) -> np.ndarray:
    """The slow, obvious reference: every pair scored, self excluded, top k."""
    x = torch.from_numpy(rows)
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
    gram = x @ x.T
    gram.fill_diagonal_(-float("inf"))
    return torch.topk(gram, k, dim=1).indices.numpy()


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_one_cell_holding_every_row_is_the_exact_table(metric):
    rows = np.random.default_rng(0).standard_normal((300, 12)).astype(np.float32)
    rows *= np.random.default_rng(1).uniform(0.5, 2, (300, 1)).astype(np.float32)  # norms vary
    table = cell_table(rows, 7, trees=1, metric=metric, cell_rows=512)
    assert table.dtype == np.int32 and table.shape == (300, 7)
    np.testing.assert_array_equal(table, exact_table(rows, 7, metric))


def test_cells_partition_the_rows_into_balanced_cells_of_near_rows():
    rows = family_rows(5000, 16, family_size=8, spread=0.2)
    order, bounds = projection_cells(rows, seed=3, cell_rows=128)
    assert sorted(order.tolist()) == list(range(5000))
    sizes = np.diff(bounds)
    assert sizes.min() >= 64 and sizes.max() <= 128  # 5000 / 2^6 = 78
    family = np.empty(5000, np.int64)
    family[order] = np.repeat(np.arange(len(sizes)), sizes)  # each row's cell
    same = family.reshape(-1, 8) == family.reshape(-1, 8)[:, :1]
    assert same.mean() > 0.6  # most of a family shares its first member's cell (1/64 at random)


def test_more_trees_find_more_of_the_exact_neighbours_and_never_repeat_one():
    rows = family_rows(4000, 24, family_size=10, spread=0.35)
    exact = exact_table(rows, 8, "ip")
    found = [recall_at_k(cell_table(rows, 8, t, seed=5, cell_rows=128), exact) for t in (1, 4)]
    assert 0.3 < found[0] < found[1] and found[1] > 0.7
    table = cell_table(rows, 8, 4, seed=5, cell_rows=128)
    scores = np.einsum("nd,nkd->nk", rows, rows[table])
    assert (table != np.arange(4000)[:, None]).all()  # never itself
    assert all(len(set(r)) == 8 for r in table.tolist())  # no id twice
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_a_label_mode_worker_hands_back_the_cell_table():
    """``table_trees`` through the real build worker: the table that comes back is the one
    the cells give for the snapshot, and steps select from it."""
    clf = make("annoy", ntrees=2, n_jobs=1, query="label", table_k=4, table_trees=2)
    m = IndexMaintainer(clf, interval=100, background="process", probe_every=0, build_threads=1)
    m.start(0)
    try:
        weights = clf.weight.detach().numpy().copy()
        m.wait(0)
        table = np.asarray(clf.sampler.table)
        np.testing.assert_array_equal(table, cell_table(weights, 4, 2, seed=0))
        train(clf, m, range(1, 3))
        out = clf(torch.randn(B, D), torch.arange(B))
        assert out.active.ids.numel() == M and m.failures == 0
    finally:
        m.close()


@pytest.mark.parametrize("name", ["annoy", "hnsw"])
def test_a_table_from_trees_alone_builds_no_index(name):
    """Label mode with ``table_trees`` and no feature share needs no index: a build makes
    the table alone (at 10^6 x 256 the annoy build was 49 s of a 116 s rebuild), and steps
    select from it; with a feature share the index is built, since steps query it."""
    clf = make(name, query="label", table_k=4, table_trees=2)
    sampler = clf.sampler
    weights = clf.weight.detach().numpy().copy()
    index, table = sampler.build(weights)
    assert sampler.table_only and index is None
    np.testing.assert_array_equal(table, cell_table(weights, 4, 2, seed=0))
    m = IndexMaintainer(clf, interval=2, background="thread", probe_every=0)
    m.start(0)
    try:
        assert not sampler.has_index and sampler.table is not None
        train(clf, m, range(1, 6))  # rebuilds in a thread, table alone each time
        m.wait(6)
        assert m.builds >= 2 and m.failures == 0 and not sampler.has_index
        out = clf(torch.randn(B, D), torch.arange(B))
        assert out.active.ids.numel() == M and out.active.num_index > 0
    finally:
        m.close()
    mixed = make(name, query="label", table_k=4, table_trees=2, feature_share=0.25).sampler
    index, table = mixed.build(weights)
    assert not mixed.table_only and index is not None and table is not None


def test_a_negative_tree_count_is_refused_naming_the_knob():
    with pytest.raises(ValueError, match="table_trees must be >= 0"):
        make("annoy", query="label", table_trees=-1)
