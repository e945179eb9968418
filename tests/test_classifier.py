"""SampledClassifier: sparse SGD vs torch SGD, exact(M=N) vs dense full, offload, state, predict."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_softmax.classifier import SampledClassifier
from hf_softmax.dense_classifier import DenseClassifier
from hf_softmax.heads import build_head
from hf_softmax.samplers import build_sampler

N, D, B = 40, 8, 6


def make(sampler="random", num=15, head="cosface", seed=0, **kw):
    h = build_head(head) if head != "linear" else build_head("linear")
    s = build_sampler({"name": sampler, "num": num}, N, h.metric, seed=seed)
    if s.dense:
        return DenseClassifier(N, D, h, s, seed=seed)
    return SampledClassifier(N, D, h, s, seed=seed, **kw)


def batches(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(B, D, generator=g), torch.randint(0, N, (B,), generator=g))
        for _ in range(steps)
    ]


@pytest.mark.parametrize("head", ["linear", "cosface", "arcface"])
def test_sparse_step_equals_torch_sgd_on_touched_rows(head):
    """Oracle: one nn.Parameter per row and torch SGD, which skips rows whose grad is None —
    the same lazy semantics: untouched rows get neither weight decay nor momentum."""
    lr, mu, wd = 0.3, 0.9, 5e-2
    clf = make(num=12, head=head, momentum=mu, weight_decay=wd)
    rows = [nn.Parameter(r.clone()) for r in clf.weight]
    opt = torch.optim.SGD(rows, lr=lr, momentum=mu, weight_decay=wd)
    touched = set()
    for feats, labels in batches(5):
        out = clf(feats, labels)
        out.loss.backward()
        clf.step(out, lr)
        ids = out.active.ids.tolist()
        touched.update(ids)
        opt.zero_grad(set_to_none=True)
        w_ref = torch.stack([rows[i] for i in ids])
        ref_loss = F.cross_entropy(clf.head(feats, w_ref, out.targets), out.targets)
        ref_loss.backward()
        opt.step()
        torch.testing.assert_close(out.loss, ref_loss)
    assert len(touched) < N  # some rows were never selected
    for i in range(N):
        torch.testing.assert_close(clf.weight[i], rows[i].detach(), rtol=1e-6, atol=1e-7)
        buf = opt.state[rows[i]].get("momentum_buffer")
        expected = torch.zeros(D) if buf is None else buf
        torch.testing.assert_close(clf.store.momentum_buffer[i], expected, rtol=1e-6, atol=1e-7)
    assert set(clf.pop_touched().tolist()) == touched and clf.pop_touched().size == 0


@pytest.mark.parametrize("head", ["linear", "cosface", "arcface"])
def test_exact_with_m_equal_n_matches_dense_full(head):
    dense = make("full", head=head)
    sampled = make("exact", num=N, head=head)
    assert torch.equal(dense.weight.detach(), sampled.weight)  # same seed, same init
    sampled.sampler.swap(sampled.sampler.build_index(sampled.snapshot_weights()))
    for feats, labels in batches(2):
        f1 = feats.clone().requires_grad_(True)
        f2 = feats.clone().requires_grad_(True)
        out_d = dense(f1, labels)
        out_s = sampled(f2, labels)
        assert out_s.logits.shape == (B, N) and out_s.active.num_positives > 0
        out_d.loss.backward()
        out_s.loss.backward()
        torch.testing.assert_close(out_s.loss, out_d.loss)
        torch.testing.assert_close(f2.grad, f1.grad)
        grad_w = torch.zeros(N, D).index_copy_(0, out_s.active.ids, out_s.rows.grad)
        torch.testing.assert_close(grad_w, dense.weight.grad)
        dense.weight.grad = None


def test_offload_and_resident_are_identical_on_cpu():
    a, b = make(offload=True), make(offload=False)
    for feats, labels in batches(4):
        for clf in (a, b):
            out = clf(feats, labels)
            out.loss.backward()
            clf.step(out, 0.1)
    assert torch.equal(a.weight, b.weight) and torch.equal(
        a.store.momentum_buffer, b.store.momentum_buffer
    )


def test_module_to_moves_rows_only_without_offload():
    resident, offloaded = make(offload=False), make(offload=True)
    resident.to(torch.float64)
    offloaded.to(torch.float64)
    assert resident.weight.dtype == torch.float64  # follows the module
    assert offloaded.weight.dtype == torch.float32  # stays where it lives
    assert not any(p is resident.weight for p in resident.parameters())
    full = build_sampler({"name": "full", "num": N}, N, "cosine")
    with pytest.raises(ValueError, match="sampler 'full' trains a DenseClassifier"):
        SampledClassifier(N, D, build_head("cosface"), full, offload=True)


def test_state_dict_round_trip_through_torch_save():
    clf = make("random")
    for feats, labels in batches(3):
        out = clf(feats, labels)
        out.loss.backward()
        clf.step(out, 0.1)
    buf = io.BytesIO()
    torch.save(clf.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert {"weight", "momentum", "num_updates", "sampler_rng"} <= set(state)
    fresh = make("random", seed=7)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.weight, clf.weight)
    assert torch.equal(fresh.store.momentum_buffer, clf.store.momentum_buffer)
    assert fresh.store.num_updates == 3 and fresh.sampler.num_selects == 3
    feats, labels = batches(1, seed=9)[0]
    assert torch.equal(fresh(feats, labels).active.ids, clf(feats, labels).active.ids)
    bad = dict(state, weight=torch.zeros(N + 1, D))
    with pytest.raises(RuntimeError, match=r"size mismatch for weight"):
        make("random").load_state_dict(bad)
    dense = make("full")
    dense.load_state_dict(make("full", seed=3).state_dict())


@pytest.mark.parametrize("head", ["linear", "cosface"])
def test_predict_equals_dense_argmax(head):
    clf = make(head=head)
    feats = torch.cat([torch.randn(20, D), clf.weight[[3, 17, 39]] * 5])
    dense = clf.head.plain_logits(feats, clf.weight).argmax(dim=1)
    assert torch.equal(clf.predict(feats, chunk_size=7), dense)
    assert clf.predict(feats[-3:]).tolist() == [3, 17, 39]


def test_no_grad_forward_keeps_no_pending_step():
    clf = make()
    before = clf.weight.clone()
    with torch.no_grad():
        out = clf(*batches(1)[0])
    assert out.rows is None
    clf.step(out, 0.1)
    assert torch.equal(clf.weight, before) and clf.store.num_updates == 0


def test_given_weight_is_used_in_place():
    w = torch.randn(N, D)
    h = build_head("cosface")
    clf = SampledClassifier(N, D, h, build_sampler({"name": "random", "num": 15}, N, h.metric),
                            weight=w)  # fmt: skip
    assert clf.weight.data_ptr() == w.data_ptr()
    assert torch.equal(clf.store.momentum_buffer, torch.zeros(N, D))
    with pytest.raises(ValueError, match=r"weight has shape \(3, 8\)"):
        SampledClassifier(N, D, h, clf.sampler, weight=torch.zeros(3, D))


def test_step_twice_on_one_output_raises():
    clf = make()
    out = clf(*batches(1)[0])
    out.loss.backward()
    clf.step(out, 0.1)
    with pytest.raises(RuntimeError, match="already updated"):
        clf.step(out, 0.1)
