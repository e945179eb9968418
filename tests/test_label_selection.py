"""Label-driven selection (``sampler.query=label``): the class-neighbour table against exact
top-k, the select against a slow obvious reference, tables from every build mode, and
selection ahead (``classifier.prefetch``) against the unpipelined step, loss for loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hf_softmax.class_table import batch_order, drop_self, table_candidates, table_recall
from hf_softmax.classifier import SampledClassifier
from hf_softmax.heads import LinearHead
from hf_softmax.index_maintainer import IndexMaintainer
from hf_softmax.samplers import build_sampler, exact_topk, recall_at_k

CONF = Path(__file__).resolve().parents[1] / "conf" / "sampler"
INDEX_SAMPLERS = ("annoy", "auto", "exact", "hnsw")


def clustered(n=600, d=16, clusters=30, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    rows = centres[rng.integers(clusters, size=n)] + 0.3 * rng.standard_normal((n, d))
    return rows.astype(np.float32)


def make(name, n, num, **knobs):
    cfg = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    cfg.update({"num": num, "query": "label", **knobs})
    return build_sampler(cfg, n, "ip", seed=0)


def built(sampler, rows):
    index = sampler.build_index(rows)
    sampler.swap(index, sampler.build_table(index, rows))
    return sampler


def reference_select(table, labels, m):
    """The obvious label select without the fill: positives (sorted), then the table rows of
    the positives rank by rank, the positives in the order the batch first shows them, each
    id once, no positive, at most m - |P|."""
    pos = sorted(set(int(x) for x in labels))
    order = list(dict.fromkeys(int(x) for x in labels))
    out = list(pos)
    for rank in range(table.shape[1]):
        for p in order:
            c = int(table[p, rank])
            if c >= 0 and c not in out and len(out) < m:
                out.append(c)
    return out


def test_every_index_sampler_yaml_has_the_label_knobs():
    for name in INDEX_SAMPLERS:
        cfg = yaml.safe_load((CONF / f"{name}.yaml").read_text())
        assert cfg["query"] == "feature" and cfg["table_k"] >= 1, name
        assert cfg["feature_share"] == 0.0, name
    with pytest.raises(ValueError, match="query must be one of"):
        make("exact", 100, 10, query="labels")


def test_drop_self_removes_own_id_or_the_last():
    ids = np.array([[0, 5, 6], [7, 8, 9], [2, -1, -1]])
    assert drop_self(ids, np.array([0, 1, 2])).tolist() == [[5, 6], [7, 8], [-1, -1]]


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_exact_table_equals_exact_topk_of_the_rows(metric):
    rows = clustered()
    sampler = build_sampler({"name": "exact", "num": 50, "query": "label", "table_k": 6},
                            rows.shape[0], metric)  # fmt: skip
    table = sampler.build_table(sampler.build_index(rows), rows)
    assert table.shape == (600, 6) and table.dtype == np.int32
    full = torch.from_numpy(rows)
    if metric == "cosine":
        full = torch.nn.functional.normalize(full, dim=1)
    scores = full @ full.T
    scores.fill_diagonal_(-float("inf"))
    truth = scores.argsort(dim=1, descending=True)[:, :6].numpy()
    assert (table == truth).mean() > 0.999  # ties aside
    assert table_recall(table, rows, np.arange(600), metric) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("name,floor", [("annoy", 0.6), ("hnsw", 0.9)])
def test_ann_table_recall_against_exact(name, floor):
    rows = clustered()
    sampler = make(name, 600, 50, table_k=8)
    table = sampler.build_table(sampler.build_index(rows), rows)
    truth = drop_self(exact_topk(rows, rows, 9), np.arange(600))
    assert recall_at_k(table.astype(np.int64), truth) >= floor
    assert not (table == np.arange(600)[:, None]).any()  # no class is its own neighbour


@pytest.mark.parametrize(
    "name,knobs",
    [("annoy", {"n_jobs": 1}), ("annoy", {"n_jobs": 3}), ("auto", {"exact_max_elements": 1}),
     ("hnsw", {}), ("exact", {"chunk_size": 100})],
)  # fmt: skip
def test_table_equals_the_by_vector_reference(name, knobs):
    """The table's fast paths (annoy by item id over threads, auto's delegation, exact's
    capped batches) give what asking the index with each row's vector gives."""
    rows = clustered(n=700)
    sampler = make(name, 700, 50, table_k=7, **knobs)
    index = sampler.build_index(rows)
    table = sampler.build_table(index, rows)
    ref = drop_self(sampler.query_index(index, rows, 8), np.arange(700))
    assert table.dtype == np.int32 and table.shape == (700, 7)
    assert (table == ref).all()


@pytest.mark.parametrize("name", INDEX_SAMPLERS)
def test_label_select_equals_the_reference(name):
    rows = clustered()
    sampler = built(make(name, 600, 80, table_k=8), rows)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        labels = torch.randint(600, (24,), generator=gen)
        active = sampler.select(None, labels)
        p = len(set(labels.tolist()))
        index_m = 80 - round(sampler.random_fraction * (80 - p))  # auto: random_fraction 0.25
        ref = reference_select(sampler.table, labels.tolist(), index_m)
        assert active.ids[: len(ref)].tolist() == ref
        assert active.num_index == len(ref) - active.num_positives
        assert active.num == 80 and len(set(active.ids.tolist())) == 80
        assert torch.equal(active.ids[active.targets], labels)


def test_label_select_before_the_first_build_and_random_fraction():
    sampler = make("exact", 600, 80, random_fraction=0.5)
    labels = torch.arange(10)
    assert sampler.select(None, labels).num_index == 0  # no table yet: random
    built(sampler, clustered())
    active = sampler.select(None, labels)
    assert active.num_index == 35  # half of the 70 negatives from the table


@pytest.mark.parametrize("mode", ["inline", "thread", "process"])
def test_every_build_mode_hands_over_the_table(mode):
    rows = torch.from_numpy(clustered())
    sampler = make("annoy", 600, 60, table_k=5, ntrees=4)
    clf = SampledClassifier(600, 16, LinearHead(), sampler, weight=rows.clone())
    background = {"inline": False, "thread": True, "process": "process"}[mode]
    maint = IndexMaintainer(clf, interval=2, background=background, build_threads=1)
    try:
        maint.start(0)
        assert sampler.table is not None and sampler.table.shape == (600, 5)
        first = sampler.table
        maint.on_step_start(2)
        maint.wait(2)
        assert sampler.num_swaps == 2 and sampler.table is not first
        truth = drop_self(exact_topk(rows, rows, 6), np.arange(600))
        assert recall_at_k(sampler.table.astype(np.int64), truth) > 0.5
        clf.sampler.select(None, torch.arange(8))
        recall, k = maint.probe(torch.zeros(4, 16))  # label mode: probes the table
        assert k == 5 and recall > 0.5
    finally:
        maint.close()


def train_steps(prefetch, steps=14, interval=4):
    """A linear backbone and a label-mode classifier trained by hand (the module's order)."""
    torch.manual_seed(0)
    n, d, b = 300, 16, 24
    rows = torch.from_numpy(clustered(n, d, 20))
    sampler = make("exact", n, 60, table_k=4, random_fraction=0.25)
    clf = SampledClassifier(n, d, LinearHead(), sampler, weight=rows.clone(),
                            prefetch=prefetch, weight_decay=5e-4)  # fmt: skip
    backbone = torch.nn.Linear(8, d)
    opt = torch.optim.SGD(backbone.parameters(), lr=0.1)
    maint = IndexMaintainer(clf, interval=interval, background=False)
    maint.start(0)
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(b, 8, generator=gen), torch.randint(n, (b,), generator=gen))
               for _ in range(steps)]  # fmt: skip
    losses, state = [], None
    for t, (x, y) in enumerate(batches):
        maint.on_step_start(t)
        nxt = batches[t + 1][1] if t + 1 < len(batches) else None
        if t == steps // 2:  # a checkpoint mid-run: undoes the selection made ahead
            state = {k: v.clone() for k, v in clf.state_dict().items()}
        out = clf(backbone(x), y, nxt)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        clf.step(out, 0.5)
        losses.append(float(out.loss.detach()))
    return losses, clf, state


def test_selection_ahead_equals_the_unpipelined_step():
    plain, clf0, state0 = train_steps(False)
    ahead, clf1, state1 = train_steps(True)
    assert ahead == plain  # loss for loss, bitwise
    assert torch.equal(clf0.weight, clf1.weight)
    assert torch.equal(clf0.store.momentum_buffer, clf1.store.momentum_buffer)
    for key in state0:
        assert torch.equal(state0[key], state1[key]), key
    assert clf0.ahead.used == 0 and clf1.ahead.used > 0 and clf1.ahead.undone > 0  # swaps
    assert clf1.store.staged_hits == clf1.ahead.used


def test_staged_rows_are_refreshed_after_the_update():
    rows = torch.from_numpy(clustered(50, 8, 5))
    sampler = built(make("exact", 50, 10, table_k=3), rows.numpy())
    clf = SampledClassifier(50, 8, LinearHead(), sampler, weight=rows.clone(), prefetch=True)
    out = clf(torch.randn(4, 8), torch.tensor([0, 1, 2, 3]), torch.tensor([2, 3, 4, 5]))
    staged = clf.store.staged
    assert staged is not None
    out.loss.backward()
    clf.step(out, 1.0)
    shared = int(np.isin(staged.ids.numpy(), out.row_ids.numpy()).sum())
    assert shared >= 2 and staged.refreshed == shared
    assert torch.equal(staged.rows, clf.weight[staged.ids])


def test_a_trimmed_table_selection_follows_the_batch_not_the_class_ids():
    """With room for fewer neighbours than the batch has classes, the classes the batch
    shows first are served, whatever their ids (sorted order served only the lowest ids:
    on Hangul, two thirds of the classes never got a hard negative)."""
    n = 100
    table = ((np.arange(n)[:, None] + np.arange(1, 4)[None, :]) % n).astype(np.int32)
    labels = torch.tensor([90, 10, 50, 90])
    order = batch_order(labels)
    assert order.tolist() == [90, 10, 50]
    assert table_candidates(table, order, 2, np.array([10, 50, 90])).tolist() == [91, 11]
    sampler = make("exact", n, 5, table_k=3)
    sampler.swap(sampler.build_index(clustered(n=n)), table)
    active = sampler.select(None, labels)
    assert active.ids[:5].tolist() == [10, 50, 90, 91, 11]
