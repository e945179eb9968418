"""Label mode with a share of per-feature queries (``sampler.feature_share``): the select
against a slow obvious reference, the knob's limits, and both the index and the table
handed back by a real build worker process."""

from __future__ import annotations

import math

import pytest
import torch

from hf_softmax.classifier import SampledClassifier
from hf_softmax.heads import LinearHead
from hf_softmax.index_files import WorkerIndex
from hf_softmax.index_maintainer import IndexMaintainer
from hf_softmax.samplers import exact_topk
from tests.test_label_selection import built, clustered, make


def reference_mixed(rows, table, feats, labels, m, share, random_fraction):
    """The obvious mixed select without the fill: positives (sorted); then round(s * want)
    ids from the exact top-k of the first ceil(s * B) features, rank by rank; then the table
    rows of the positives rank by rank in batch order; each id once, no positive."""
    pos = sorted(set(int(x) for x in labels))
    negatives = m - len(pos)
    want = negatives - int(round(random_fraction * negatives))
    nf = max(1, math.ceil(share * len(labels)))
    want_f = int(round(share * want))
    k = math.ceil(want_f / nf) + 1
    nbrs = exact_topk(rows, feats[:nf], k, "ip")
    out = list(pos)
    for rank in range(k):
        for i in range(nf):
            c = int(nbrs[i, rank])
            if c not in out and len(out) < len(pos) + want_f:
                out.append(c)
    order = list(dict.fromkeys(int(x) for x in labels))
    for rank in range(table.shape[1]):
        for p in order:
            c = int(table[p, rank])
            if c >= 0 and c not in out and len(out) < len(pos) + want:
                out.append(c)
    return out


@pytest.mark.parametrize("share", [0.25, 0.5, 1.0])
def test_mixed_select_equals_the_reference(share):
    rows = clustered()
    sampler = built(make("exact", 600, 90, table_k=6, feature_share=share,
                         random_fraction=0.2), rows)  # fmt: skip
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        labels = torch.randint(600, (24,), generator=gen)
        feats = torch.from_numpy(rows[labels.numpy()]) + 0.3 * torch.randn(24, 16, generator=gen)
        active = sampler.select(feats, labels)
        ref = reference_mixed(rows, sampler.table, feats.numpy(), labels.tolist(), 90, share, 0.2)
        assert active.ids[: len(ref)].tolist() == ref
        assert active.num_index == len(ref) - active.num_positives
        assert active.num == 90 and len(set(active.ids.tolist())) == 90
        assert torch.equal(active.ids[active.targets], labels)


def test_share_zero_is_label_mode_and_the_knob_is_checked():
    rows = clustered()
    plain = built(make("exact", 600, 80, table_k=6), rows)
    zero = built(make("exact", 600, 80, table_k=6, feature_share=0.0), rows)
    half = make("exact", 600, 80, table_k=6, feature_share=0.5)
    labels = torch.randint(600, (24,), generator=torch.Generator().manual_seed(0))
    feats = torch.randn(24, 16)
    assert torch.equal(plain.select(feats, labels).ids, zero.select(feats, labels).ids)
    assert plain.selects_ahead and not half.selects_ahead  # it needs the features
    assert not plain.queries_features and half.queries_features
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="feature_share must be in"):
            make("exact", 600, 80, feature_share=bad)


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_a_build_worker_hands_back_the_index_too_when_steps_query_it(share):
    rows = torch.from_numpy(clustered())
    sampler = make("annoy", 600, 60, table_k=5, ntrees=4, feature_share=share)
    clf = SampledClassifier(600, 16, LinearHead(), sampler, weight=rows.clone())
    maint = IndexMaintainer(clf, interval=2, background="process", build_threads=1)
    try:
        maint.start(0)
        assert sampler.table is not None and sampler.table.shape == (600, 5)
        assert isinstance(sampler.index, WorkerIndex) == (share == 0)
        labels = torch.arange(0, 600, 25)
        active = clf.sampler.select(rows[labels] + 0.01, labels)
        assert active.num_index == 60 - labels.numel()
        if share:  # the feature part: each queried sample's nearest other row
            near = exact_topk(rows.numpy(), rows[labels[:12]].numpy(), 2, "ip")[:, 1]
            got = set(active.ids[labels.numel() :].tolist())
            assert len(got & set(near.tolist())) >= 6
    finally:
        maint.close()
