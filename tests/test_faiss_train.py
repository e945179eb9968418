"""sampler=faiss in a real Trainer: background ivf rebuilds, recall probes, target_recall."""

from __future__ import annotations

import pytest
import torch

from callbacks.index_rebuild import IndexRebuild
from hf_softmax.build import build_module
from hf_softmax.samplers.exact import exact_topk, recall_at_k
from tests.test_index_rebuild import NUM_CLASSES, fit, make_cfg


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_faiss_background_rebuilds_and_target_recall(index):
    # 200 classes -> nlist 5; nprobe 1 scans one cell of five: recall far below 0.99
    cfg = make_cfg("faiss", index=index, nprobe=1, efSearch=1, m=4, threads=1, query_threads=1)
    module = build_module(cfg, NUM_CLASSES)
    sampler = module.classifier.sampler
    cb = IndexRebuild(interval=4, background=True, probe_every=1, probe_k=5, target_recall=0.99)
    fit(module, [cb], steps=9)
    maintainer = cb.maintainer
    assert maintainer.builds >= 2 and all(r.ok for r in maintainer.history)
    assert sampler.backend == "faiss-cpu" and sampler.has_index
    assert maintainer.target.raised >= 1  # the probe raised the query effort
    assert sampler.effort > 1  # nprobe / efSearch raised from 1
    # the probe is recall of the faiss index against exact top-k on the same features
    feats = torch.randn(8, 32)
    weights = module.classifier.snapshot_weights(as_selected=True)  # test_index_maintainer
    expected = recall_at_k(sampler.query(feats.numpy(), 5), exact_topk(weights, feats, 5, "cosine"))
    assert maintainer.probe(feats)[0] == pytest.approx(expected)
