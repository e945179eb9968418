"""Selection knobs shared by every sampler: random_fraction, index_after, the logq correction."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_softmax.classifier import SampledClassifier
from hf_softmax.heads import CosFaceHead
from hf_softmax.samplers import build_sampler, exact_topk


def _rows(n=600, d=16, seed=0):
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(n, d)).astype(np.float32)
    labels = torch.from_numpy(rng.integers(0, n, 32))
    feats = torch.from_numpy(
        rows[labels.numpy()] + 0.1 * rng.normal(size=(32, d)).astype(np.float32)
    )
    return rows, feats, labels


def _exact(n, num, **sel):
    return build_sampler({"name": "exact", "num": num, **sel}, n, "cosine", seed=0)


@pytest.mark.parametrize("fraction", [0.0, 0.25, 1.0])
def test_random_fraction_splits_the_negatives(fraction):
    rows, feats, labels = _rows()
    sampler = _exact(600, 120, random_fraction=fraction)
    sampler.swap(sampler.build_index(rows))
    active = sampler.select(feats, labels)
    negatives = 120 - active.num_positives
    target = negatives - round(fraction * negatives)
    # at most the target (fewer when the deduplicated neighbours run out), never none
    assert active.num_index <= target and (active.num_index > 0) == (target > 0)
    # the index part is the exact nearest rows (rank-major), positives excluded
    k = math.ceil(active.num_index / 32) + 1 if active.num_index else 1
    nearest = set(exact_topk(rows, feats.numpy(), k, "cosine").reshape(-1).tolist())
    index_ids = active.ids[active.num_positives : active.num_positives + active.num_index]
    assert set(index_ids.tolist()) <= nearest
    assert torch.unique(active.ids).numel() == 120


def test_index_after_selects_randomly_first():
    rows, feats, labels = _rows()
    sampler = _exact(600, 120, index_after=3)
    sampler.swap(sampler.build_index(rows))
    counts = [sampler.select(feats, labels).num_index for _ in range(5)]
    assert counts[:3] == [0, 0, 0] and min(counts[3:]) > 0


def test_logq_adjusts_only_the_uniform_draws():
    rows, feats, labels = _rows()
    sampler = _exact(600, 120, random_fraction=0.5, correction="logq")
    sampler.swap(sampler.build_index(rows))
    active = sampler.select(feats, labels)
    chosen = active.num_positives + active.num_index
    adjust = active.logit_adjust
    assert adjust.shape == (120,) and torch.all(adjust[:chosen] == 0)
    expected = math.log((600 - chosen) / (120 - chosen))
    assert torch.allclose(adjust[chosen:], torch.full((120 - chosen,), expected))


def test_logq_normaliser_is_unbiased_for_random_draws():
    """E[sum over the active set of exp(logit + adjust)] = the full normaliser (random)."""
    n, num = 400, 60
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(size=n).astype(np.float32))
    labels = torch.tensor([3, 7, 11])
    sampler = build_sampler({"name": "random", "num": num, "correction": "logq"}, n, "ip", 0)
    totals = []
    for _ in range(4000):
        a = sampler.select(torch.zeros(3, 4), labels)
        totals.append(float(torch.exp(logits[a.ids] + a.logit_adjust).sum()))
    full = float(torch.exp(logits).sum())
    assert abs(np.mean(totals) / full - 1) < 0.01


def test_classifier_loss_uses_the_correction():
    """SampledClassifier's loss with logq = cross-entropy of (margin logits + adjust), by hand."""
    rows, feats, labels = _rows(n=300)
    head = CosFaceHead(scale=20.0, margin=0.1)
    sampler = build_sampler(
        {"name": "random", "num": 64, "correction": "logq"}, 300, head.metric, seed=0
    )
    clf = SampledClassifier(300, 16, head, sampler, init_std=0.1, seed=0)
    out = clf(feats, labels)
    a = out.active
    w = clf.weight[a.ids]
    cos = F.normalize(feats, dim=1) @ F.normalize(w, dim=1).t()
    cos[torch.arange(32), a.targets] -= 0.1
    expected = F.cross_entropy(20.0 * cos + a.logit_adjust, a.targets)
    assert torch.allclose(out.loss, expected, atol=1e-5)


@pytest.mark.parametrize(
    "knob, value", [("random_fraction", 1.5), ("index_after", -1), ("correction", "bogus")]
)
def test_bad_selection_knobs_are_named(knob, value):
    with pytest.raises(ValueError, match=knob):
        build_sampler({"name": "random", "num": 10, knob: value}, 100, "ip")


@pytest.mark.parametrize("dim, kind", [(16, "exact"), (64, "annoy")])
def test_auto_picks_exact_below_the_size_limit(dim, kind, caplog):
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(500, dim)).astype(np.float32)
    sampler = build_sampler(
        {"name": "auto", "num": 50, "exact_max_elements": 500 * 32, "ntrees": 20},
        500,
        "cosine",
    )
    with caplog.at_level("INFO"):
        sampler.swap(sampler.build_index(rows))
    assert sampler.kind == kind and f"sampler 'auto': {kind}" in caplog.text
    feats = torch.from_numpy(rows[:8] + 0.01)
    found = sampler.query(feats.numpy(), 5)
    truth = exact_topk(rows, feats.numpy(), 5, "cosine")
    if kind == "exact":
        assert np.array_equal(found, truth)
    else:
        assert (found[:, 0] == truth[:, 0]).mean() >= 0.75


class _Effort:
    """A sampler stand-in with the effort interface (what RecallTarget steers)."""

    num_classes = effort_limit = 1000

    def __init__(self, effort=-1):
        self.effort = effort

    def default_effort(self, k):
        return 10 * k


def test_recall_target_raises_effort_on_a_fresh_index_and_rebuilds_a_stale_one():
    from hf_softmax.recall_target import RecallTarget

    target = RecallTarget(0.9, fresh_steps=5)
    s = _Effort()
    assert target.update(s, 0.5, k=2, steps_since_swap=1) == "raise" and s.effort == 40
    assert target.update(s, 0.5, k=2, steps_since_swap=1) == "raise" and s.effort == 80
    assert target.update(s, 0.5, k=2, steps_since_swap=30) == "rebuild" and s.effort == 80
    assert target.update(s, 1.0, k=2, steps_since_swap=0) == "lower" and s.effort == 60
    assert target.update(s, 0.95, k=2, steps_since_swap=0) is None
    with pytest.raises(ValueError, match="target_recall"):
        RecallTarget(1.5)


def test_background_auto_builds_exact_inline_and_small_indexes_in_a_thread():
    """(Large ones go to a build worker process: tests/test_worker_process.py.)"""
    from types import SimpleNamespace

    from hf_softmax.index_maintainer import IndexMaintainer

    for name, mode in (("exact", "inline"), ("annoy", "thread"), ("hnsw", "thread")):
        sampler = build_sampler({"name": name, "num": 10}, 100, "cosine")
        clf = SimpleNamespace(sampler=sampler, weight=torch.zeros(100, 8))
        maintainer = IndexMaintainer(clf, background="auto")
        assert maintainer.mode() == mode
    auto = build_sampler({"name": "auto", "num": 10}, 100, "cosine")
    auto.build_index(np.zeros((100, 8), np.float32))  # N x D small: the exact backend
    assert auto.inline_build
    with pytest.raises(ValueError, match="background"):
        IndexMaintainer(None, background="sometimes")


def test_effort_is_each_index_query_knob():
    annoy = build_sampler({"name": "annoy", "num": 10, "ntrees": 5}, 100, "cosine")
    annoy.effort = 400
    assert annoy.search_k == 400 and annoy.default_effort(3) == 15
    hnsw = build_sampler({"name": "hnsw", "num": 10, "ef": 32}, 100, "cosine")
    hnsw.effort = 64
    assert hnsw.ef == 64 and hnsw.effort == 64
    exact = build_sampler({"name": "exact", "num": 10}, 100, "cosine")
    exact.effort = 5  # no knob: ignored
    assert exact.effort is None and exact.default_effort(3) is None
