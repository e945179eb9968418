"""``target_recall`` tunes the query effort by measuring (feature mode): the probe's features
queried again at other efforts against the same exact top-k (``recall_probe.measure_recall``,
``recall_target.RecallTarget``). Stand-ins for the rules, then real faiss and annoy indexes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_softmax.index_maintainer import IndexMaintainer
from hf_softmax.recall_probe import measure_recall
from hf_softmax.recall_target import RecallTarget
from hf_softmax.samplers import build_sampler
from tests.test_index_maintainer import make


class _Curve:
    """A sampler stand-in whose recall at each effort is a table (what ``recall_at`` reads)."""

    num_classes = 10_000

    def __init__(self, effort: int, curve: dict[int, float], limit: int = 10_000):
        self.effort, self.curve, self.effort_limit, self.asked = effort, curve, limit, []

    def default_effort(self, k: int) -> int:
        return 10 * k

    def recall_at(self, effort: int) -> float:
        self.asked.append(effort)
        return self.curve[effort]


def test_below_the_target_the_effort_doubles_to_the_first_that_reaches_it():
    s = _Curve(20, {10_000: 1.0, 40: 0.7, 80: 0.85, 160: 0.93, 320: 0.97})
    target = RecallTarget(0.9)
    assert target.update(s, 0.5, k=2, steps_since_swap=1, recall_at=s.recall_at) == "raise"
    assert s.effort == 160 and s.asked == [10_000, 40, 80, 160] and target.raised == 1


def test_when_the_most_effort_finds_no_more_the_misses_are_drift():
    s = _Curve(20, {10_000: 0.605})  # the cap (1024 x 20, at most N) gains 0.005
    target = RecallTarget(0.9)
    assert target.update(s, 0.6, k=2, steps_since_swap=0, recall_at=s.recall_at) is None
    assert s.effort == 20 and target.drift_limited == 1 and target.raised == 0
    # the cap gains, but never reaches the target: stop where it gets within min_gain of it
    s = _Curve(20, {10_000: 0.8, 40: 0.6, 80: 0.6, 160: 0.795})  # steps, as annoy's leaves
    assert target.update(s, 0.6, k=2, steps_since_swap=0, recall_at=s.recall_at) == "raise"
    assert s.effort == 160


def test_the_raise_stops_at_the_effort_limit():
    s = _Curve(20, {100: 0.7, 40: 0.5, 80: 0.6}, limit=100)  # e.g. faiss IVF with nlist 100
    assert RecallTarget(0.9).update(s, 0.4, 2, 0, s.recall_at) == "raise"
    assert s.effort == 100 and s.asked == [100, 40, 80]
    target = RecallTarget(0.9)  # at the limit already: nothing to ask, no drift verdict
    assert target.update(s, 0.7, 2, 0, s.recall_at) is None
    assert s.asked == [100, 40, 80] and target.drift_limited == 0


def test_above_the_target_the_effort_halves_while_recall_holds_in_one_probe():
    # target 0.85, slack 0.1: a halved effort is kept while its recall >= 0.9
    s = _Curve(1280, {640: 0.99, 320: 0.97, 160: 0.92, 80: 0.88})
    target = RecallTarget(0.85)
    assert target.update(s, 1.0, k=2, steps_since_swap=0, recall_at=s.recall_at) == "lower"
    assert s.effort == 160 and s.asked == [640, 320, 160, 80] and target.lowered == 1
    # never below the default (10 * k = 20)
    s = _Curve(80, {40: 0.99, 20: 0.99})
    assert target.update(s, 1.0, 2, 0, s.recall_at) == "lower" and s.effort == 20
    assert target.update(s, 1.0, 2, 0, s.recall_at) is None and s.asked == [40, 20]


def test_a_stale_probe_asks_for_a_rebuild_and_measures_nothing():
    s = _Curve(20, {})
    assert RecallTarget(0.9, fresh_steps=5).update(s, 0.5, 2, 30, s.recall_at) == "rebuild"
    assert s.asked == [] and s.effort == 20


def test_tuning_keeps_the_configured_effort_as_the_default():
    # hnsw and faiss read their default from the knob target_recall tunes: after a raise the
    # default must stay the configured value, or the effort could never come down again
    faiss_ivf = build_sampler({"name": "faiss", "num": 10, "nprobe": 4, "nlist": 20}, 1000, "ip")
    faiss_ivf.effort = 16
    assert faiss_ivf.nprobe == 16 and faiss_ivf.default_effort(3) == 4
    assert faiss_ivf.effort_limit == 20  # nprobe = nlist scans every cell
    hnsw = build_sampler({"name": "hnsw", "num": 10, "ef": 32}, 1000, "ip")
    hnsw.effort = 64
    hnsw.effort = 128
    assert hnsw.ef == 128 and hnsw.default_effort(3) == 32 and hnsw.effort_limit == 1000


def _clustered(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows in families (trained-like: each row's nearest rows are mostly its family's) and
    features near random rows: at nlist 64, recall@4 climbs from 0.57 (nprobe 2) to 1."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 10, d)).astype(np.float32)
    rows = centres.repeat(10, axis=0) + rng.standard_normal((n, d)).astype(np.float32)
    labels = rng.integers(n, size=64)
    feats = rows[labels] + 0.5 * rng.standard_normal((64, d)).astype(np.float32)
    return rows, feats


def _reference_recall(sampler, rows: np.ndarray, feats: np.ndarray, k: int, effort: int):
    """Slow and obvious: the index at ``effort`` against an argsort of every inner product."""
    own = sampler.effort
    sampler.effort = effort
    found = sampler.query(feats, k)
    sampler.effort = own
    truth = np.argsort(-(feats @ rows.T), axis=1, kind="stable")[:, :k]
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth, strict=True)]))


def test_a_faiss_effort_set_on_structureless_rows_comes_down_in_one_probe():
    rows, feats = _clustered(4000, 32)
    sampler = build_sampler({"name": "faiss", "num": 50, "nprobe": 2, "nlist": 64,
                             "threads": 1, "query_threads": 1}, 4000, "ip")  # fmt: skip
    sampler.swap(sampler.build_index(rows))
    sampler.effort = 64  # every cell: what a race on N(0, 0.01) rows ends at
    recall, k, recall_at = measure_recall(sampler, rows, feats, probe_k=4)
    assert recall == pytest.approx(_reference_recall(sampler, rows, feats, 4, 64))
    assert sampler.effort == 64  # measuring leaves the serving effort alone
    target = RecallTarget(0.8)
    assert target.update(sampler, recall, k, 0, recall_at) == "lower"
    chosen = sampler.effort
    assert 2 < chosen < 64
    # the least effort on the halving path whose recall holds target + slack / 2
    assert _reference_recall(sampler, rows, feats, 4, chosen) >= 0.85
    assert _reference_recall(sampler, rows, feats, 4, chosen // 2) < 0.85


def test_drift_no_effort_can_fix_leaves_the_effort_and_a_stale_probe_rebuilds():
    clf = make("annoy", ntrees=2, n_jobs=1, search_k=-1)
    u = torch.nn.functional.normalize(torch.randn(clf.weight.shape[1]), dim=0)
    with torch.no_grad():
        clf.weight[:10] = -100 * u  # in the snapshot: the farthest rows from u
    m = IndexMaintainer(clf, interval=1000, background=False, probe_every=1, probe_k=5,
                        target_recall=0.95)  # fmt: skip
    m.start(0)
    with torch.no_grad():
        clf.weight[:10] = 100 * u  # now the nearest rows of any feature along u
    feats = u + 0.01 * torch.randn(8, u.shape[0])
    effort = clf.sampler.effort
    # a fresh probe: recall 0 at every effort (the index ranks those rows last), so no raise
    assert m.on_step_end(1, feats)["index/recall@5"] == 0.0
    assert m.target.drift_limited == 1 and m.target.raised == 0 and clf.sampler.effort == effort
    m.on_step_end(30, feats)  # a stale one asks for a rebuild
    assert m.target.rebuilds == 1
    assert m.on_step_start(30)["index/builds"] == 2.0


def test_the_retune_benchmark_runs_the_real_race_and_probe(tmp_path):
    from bench import effort_retune

    data = effort_retune.main(["--sizes", "3000", "--d", "32", "--out", str(tmp_path / "r")])
    (result,) = data["results"]
    assert result["winner"] in ("annoy", "faiss") and (tmp_path / "r.json").is_file()
    before, after = result["before"], result["after"]
    # the race on structureless rows left a high effort; the probe on shaped rows lowers it
    assert after["effort"] <= before["effort"] and after["recall"] >= 0.9
    assert "| 3,000 |" in "\n".join(effort_retune.render(data))
