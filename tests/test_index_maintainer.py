"""IndexMaintainer without Lightning: a real SampledClassifier, real samplers and indexes,
driven step by step the way a training loop does (start, on_step_start, forward/backward,
sparse step, on_step_end)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from hf_softmax.class_table import table_candidates
from hf_softmax.classifier import SampledClassifier
from hf_softmax.dense_classifier import DenseClassifier
from hf_softmax.heads import build_head
from hf_softmax.index_files import WorkerIndex
from hf_softmax.index_maintainer import IndexMaintainer
from hf_softmax.samplers import build_sampler, exact_topk, recall_at_k
from hf_softmax.samplers.annoy import AnnoySampler

N, D, B, M = 300, 16, 8, 40


def make(name: str = "exact", **knobs) -> SampledClassifier | DenseClassifier:
    head = build_head("linear")
    sampler = build_sampler({"name": name, "num": M, **knobs}, N, head.metric, seed=0)
    kind = DenseClassifier if sampler.dense else SampledClassifier
    return kind(N, D, head, sampler, seed=0, init_std=1.0)


def train(clf, maintainer: IndexMaintainer, steps: range, seed: int = 0) -> list[dict]:
    """Real steps; returns the metrics every hook reported."""
    g = torch.Generator().manual_seed(seed)
    logged = []
    for step in steps:
        logged.append(maintainer.on_step_start(step))
        labels = torch.randint(N, (B,), generator=g)
        feats = torch.randn(B, D, generator=g).requires_grad_(True)
        out = clf(feats, labels)
        out.loss.backward()
        clf.step(out, 0.5)
        logged.append(maintainer.on_step_end(step + 1, feats.detach()))
    return logged


def test_inline_schedule_builds_from_the_current_rows():
    clf = make("exact")
    m = IndexMaintainer(clf, interval=3, background=False, probe_every=0)
    m.start(0)
    train(clf, m, range(0, 4))
    assert [r.start_step for r in m.history] == [0, 3] and m.builds == 2
    # the index is W as it was at the start of step 3 (exact: a copy of the rows)
    w3 = clf.snapshot_weights()
    train(clf, m, range(4, 6))
    assert not torch.equal(m.sampler.index, torch.from_numpy(clf.snapshot_weights()))
    assert m.on_step_start(6) == {"index/rebuild_seconds": pytest.approx(m.history[-1].seconds),
                                  "index/builds": 3.0}  # fmt: skip
    assert torch.equal(m.sampler.index, torch.from_numpy(clf.snapshot_weights()))
    assert not np.array_equal(w3, clf.snapshot_weights())


def test_thread_build_is_swapped_at_a_step_start():
    clf = make("annoy", ntrees=4, n_jobs=1)
    m = IndexMaintainer(clf, interval=2, background=True, probe_every=0)
    assert m.mode() == "thread"
    m.start(0)
    first = m.sampler.index
    train(clf, m, range(0, 3))  # step 2 starts a background build
    m.wait(3)
    assert not m.busy and m.sampler.index is not first
    assert [r.start_step for r in m.history] == [0, 2] and m.history[1].background
    m.close()


def test_probe_matches_exact_reference_and_is_logged():
    clf = make("annoy", ntrees=2, n_jobs=1)
    m = IndexMaintainer(clf, interval=100, background=False, probe_every=2, probe_k=5)
    m.start(0)
    logged = train(clf, m, range(0, 3))
    seen = clf.snapshot_weights()  # the rows step 3 selects with
    logged = [x for x in logged + train(clf, m, range(3, 4), seed=1) if "index/recall@5" in x]
    assert len(logged) == 2 and m.probes == 2
    assert logged[-1]["index/recall@5"] == m.last_recall and logged[-1]["index/k"] == 5.0
    assert not np.array_equal(seen, clf.snapshot_weights())  # step 3 moved rows
    feats = torch.randn(6, D)  # truth: exact top-k over the rows as step 3's selection saw them
    expected = recall_at_k(clf.sampler.query(feats.numpy(), 5), exact_topk(seen, feats, 5, "ip"))
    assert m.probe(feats) == (pytest.approx(expected), 5)


def test_probe_does_not_count_the_steps_own_update_as_misses():
    # an exact index rebuilt before every step serves the true top-k: recall 1.0 at every
    # probe, though each step pushed its negatives away (against the updated rows: < 1)
    clf = make("exact")
    m = IndexMaintainer(clf, interval=1, background=False, probe_every=1)
    m.start(0)
    g = torch.Generator().manual_seed(0)
    after = []
    for step in range(6):
        m.on_step_start(step)
        feats = torch.randn(B, D, generator=g).requires_grad_(True)
        out = clf(feats, torch.randint(N, (B,), generator=g))
        out.loss.backward()
        clf.step(out, 0.5)
        assert m.on_step_end(step + 1, feats.detach())["index/recall@k"] == 1.0
        k = clf.sampler.last_k
        served = clf.sampler.query(feats.detach().numpy(), k)
        after.append(recall_at_k(served, exact_topk(clf.snapshot_weights(), feats, k, "ip")))
    assert min(after) < 1.0


def test_probe_k_null_measures_at_the_steps_k():
    clf = make("exact")
    m = IndexMaintainer(clf, interval=1, background=False, probe_every=1)
    m.start(0)
    logged = train(clf, m, range(0, 1))[-1]
    assert logged["index/k"] == float(clf.sampler.last_k)
    assert logged["index/recall@k"] == 1.0  # exact over the rows the step selected with


def test_adaptive_rebuilds_at_the_next_step():
    clf = make("exact")
    m = IndexMaintainer(clf, interval=1000, background=False, probe_every=2, adaptive=True,
                        min_recall=1.01)  # fmt: skip
    m.start(0)
    train(clf, m, range(0, 5))
    assert m.adaptive_triggers == 2 and [r.start_step for r in m.history] == [0, 2, 4]


def test_target_recall_raises_the_query_effort():
    clf = make("annoy", ntrees=1, n_jobs=1, search_k=2)
    m = IndexMaintainer(clf, interval=1000, background=False, probe_every=1, probe_k=20,
                        target_recall=1.0)  # fmt: skip
    m.start(0)
    logged = train(clf, m, range(0, 2))[-1]
    assert clf.sampler.search_k > 2 and logged["index/effort"] == clf.sampler.search_k


def test_hnsw_refreshes_touched_rows():
    clf = make("hnsw", num_threads=1, refresh_fraction=1.0)
    m = IndexMaintainer(clf, interval=2, background=False, probe_every=0)
    m.start(0)
    train(clf, m, range(0, 3))
    assert [r.kind for r in m.history] == ["build", "refresh"] and m.refreshes == 1


@pytest.mark.parametrize("name", ["random", "full"])
def test_no_op_without_index(name):
    clf = make(name)
    m = IndexMaintainer(clf, interval=1, background=True, probe_every=1)
    assert not m.active and m.start(0) == {}
    assert train(clf, m, range(0, 2)) == [{}] * 4 and not m.history


def test_state_dict_resumes_the_schedule():
    clf = make("exact")
    m = IndexMaintainer(clf, interval=3, background=False, probe_every=2)
    m.start(0)
    train(clf, m, range(0, 5))
    state = m.state_dict()
    resumed = IndexMaintainer(clf, interval=3, background=False, probe_every=2)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == pytest.approx(state, nan_ok=True)
    resumed.start(5)  # the index is rebuilt from W, never loaded
    train(clf, resumed, range(5, 7))
    assert [r.start_step for r in resumed.history] == [5, 6]
    assert resumed.builds == state["builds"] + 2 and resumed.probes == state["probes"] + 1


def test_close_drops_a_running_build():
    clf = make("annoy", ntrees=2, n_jobs=1)
    m = IndexMaintainer(clf, interval=1, background=True, probe_every=0)
    m.start(0)
    m.on_step_start(1)
    assert m.busy
    m.close()
    assert not m.busy and m.on_step_start(1) == {}


@pytest.mark.parametrize("name", ["annoy", "exact"])
def test_process_build_matches_a_build_in_this_process(name):
    """The worker's index (through shared memory and a file) answers like one built here."""
    knobs = {"annoy": {"ntrees": 4, "n_jobs": 1}}.get(name, {})
    clf = make(name, **knobs)
    m = IndexMaintainer(clf, interval=100, background="process", probe_every=0, build_threads=1)
    m.start(0)
    try:
        train(clf, m, range(0, 2))
        m.on_step_start(100)  # the worker builds from the rows as they are now
        m.wait(100)
        assert m.failures == 0 and m.history[-1].background and m.worker.pid is not None
        weights = clf.snapshot_weights()
        reference = make(name, **knobs).sampler
        reference.swap(reference.build_index(weights))
        feats = torch.randn(B, D).numpy()  # annoy: same seed, same rows -> same forest
        np.testing.assert_array_equal(clf.sampler.query(feats, 5), reference.query(feats, 5))
    finally:
        m.close()
    assert m.worker is None


@pytest.mark.parametrize("query", ["feature", "label"])
def test_hnsw_under_background_process(query, caplog):
    """hnswlib reads a graph file whole under the GIL, so the trainer never loads one: in
    feature mode ``background=process`` refreshes in a thread with ``build_threads``
    add_items threads (the spare graph: two graphs take turns, none is copied after start);
    in label mode the worker refreshes its own graph in place and hands back the table."""
    clf = make("hnsw", num_threads=2, query=query, table_k=4, refresh_fraction=1.0)
    m = IndexMaintainer(clf, interval=100, background="process", probe_every=0, build_threads=1)
    with caplog.at_level("INFO", logger="hf_softmax.index_build"):
        m.start(0)
    sampler = clf.sampler
    graphs = {id(sampler.index), id(sampler._spare)}
    try:
        for step in (100, 200):
            train(clf, m, range(step - 2, step))
            m.on_step_start(step)
            m.wait(step)
        assert [r.kind for r in m.history] == ["build", "refresh", "refresh"]
        assert m.failures == 0 and all(r.background for r in list(m.history)[1:])
        feats = torch.randn(B, D).numpy()
        if query == "feature":
            assert m.mode() == "thread" and m.worker is None and sampler.build_threads == 1
            assert "under the GIL" in caplog.text and id(sampler.index) in graphs
            truth = exact_topk(clf.snapshot_weights(), feats, 5, "ip")
            assert recall_at_k(sampler.query(feats, 5), truth) >= 0.8
        else:
            assert m.mode() == "process" and m.worker.pid is not None
            assert isinstance(sampler.index, WorkerIndex) and sampler.table.shape == (N, 4)
            assert sampler._spare is None and sampler.build_threads is None
    finally:
        m.close()


@pytest.mark.parametrize("name", ["annoy", "exact"])
def test_process_build_in_label_mode_hands_back_only_the_table(name):
    """Label mode: the worker keeps its index and returns the class table, which equals the
    table of the same build made here; the trainer holds a WorkerIndex and an mmapped table,
    and selects from it. The query effort the trainer tuned reaches the worker."""
    knobs = {"annoy": {"ntrees": 4, "n_jobs": 1}}.get(name, {})
    clf = make(name, query="label", table_k=6, **knobs)
    m = IndexMaintainer(clf, interval=100, background="process", probe_every=0, build_threads=1)
    m.start(0)
    try:
        train(clf, m, range(0, 2))
        if name == "annoy":
            clf.sampler.effort = 4  # as target_recall would: a poorer table than the default
        block = m.worker.shared_block  # made by the first build, reused by the next
        m.on_step_start(100)
        m.wait(100)
        assert block is not None and m.worker.shared_block == block
        assert m.failures == 0 and m.history[-1].background
        sampler = clf.sampler
        assert isinstance(sampler.index, WorkerIndex) and sampler.index.pid == m.worker.pid
        assert isinstance(sampler.table, np.memmap) and sampler.table.shape == (N, 6)
        reference = make(name, query="label", table_k=6, **knobs).sampler
        if name == "annoy":
            reference.effort = 4
        weights = clf.snapshot_weights()
        index = reference.build_index(weights)
        np.testing.assert_array_equal(sampler.table, reference.build_table(index, weights))
        labels = torch.arange(B)
        out = clf(torch.randn(B, D), labels)  # selects from the table, no index query
        expected = table_candidates(np.asarray(sampler.table), np.arange(B), M - B)
        assert out.active.ids[B : B + expected.size].tolist() == expected.tolist()
    finally:
        m.close()
    assert not os.path.exists(f"/dev/shm/{block}")  # freed with the worker


@pytest.mark.parametrize("query", ["feature", "label"])
def test_process_builds_keep_only_the_files_of_the_last_two_builds(query):
    """The trainer never deletes a file it maps (its munmap would free the pages inside a
    step); the worker deletes the older builds' files at its next request."""
    clf = make("annoy", ntrees=2, n_jobs=1, query=query, table_k=4)
    m = IndexMaintainer(clf, interval=100, background="process", probe_every=0, build_threads=1)
    m.start(0)  # build 1
    try:
        for step in (100, 200, 300):  # builds 2, 3, 4
            train(clf, m, range(step - 1, step))
            m.on_step_start(step)
            m.wait(step)
        tmp = m.worker.tmpdir
        suffix = ".table.npy" if query == "label" else ""
        assert sorted(os.listdir(tmp)) == [f"index-3{suffix}", f"index-4{suffix}"]
        out = clf(torch.randn(B, D), torch.arange(B))  # the served build 4 is intact
        assert out.active.ids.numel() == M and m.failures == 0
    finally:
        m.close()
    assert not os.path.exists(tmp)


class CrashingAnnoy(AnnoySampler):
    """A real Annoy sampler whose build kills its process (as the OOM killer would) while
    the file ``crash_marker`` exists; the crash removes the file first."""

    def __init__(self, *a, crash_marker: str = "", **kw):
        super().__init__(*a, **kw)
        self.crash_marker = crash_marker

    def build_index(self, weights):
        if self.crash_marker and os.path.exists(self.crash_marker):
            os.remove(self.crash_marker)
            os._exit(3)
        return super().build_index(weights)


def test_process_worker_crash_is_a_clear_failure_and_the_next_build_recovers(caplog, tmp_path):
    marker = tmp_path / "crash"
    sampler = CrashingAnnoy(N, M, "ip", 0, ntrees=2, n_jobs=1, crash_marker=str(marker))
    clf = SampledClassifier(N, D, build_head("linear"), sampler, seed=0, init_std=1.0)
    m = IndexMaintainer(clf, interval=100, background="process", probe_every=0)
    m.start(0)
    try:
        m.on_step_start(100)
        m.wait(100)
        first, tmpdir = m.worker.pid, m.worker.tmpdir
        marker.touch()
        with caplog.at_level("ERROR", logger="hf_softmax.index_maintainer"):
            m.on_step_start(200)
            m.wait(200)  # returns: a dead worker is an error, not a hang
        assert m.failures == 1 and "died with exit code 3" in caplog.text
        m.on_step_start(300)  # a new worker builds
        m.wait(300)
        assert m.failures == 1 and m.history[-1].ok and m.worker.pid != first
    finally:
        m.close()
    assert not os.path.exists(tmpdir)


def _mapped_files(pid: int, folder: str) -> list[str]:
    with open(f"/proc/{pid}/maps") as fh:
        return [line.split()[-1] for line in fh if line.split()[-1].startswith(folder)]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc (Linux)")
def test_process_worker_frees_its_index_once_it_has_replied():
    """The worker drops the index it built (and saved for the trainer) as soon as its reply
    is sent, not at the next request: between rebuilds it maps none of its index files
    (1.2 GB held idle at 10^6 x 256 before)."""
    clf = make("annoy", ntrees=2, n_jobs=1)
    m = IndexMaintainer(clf, interval=100, background="process", probe_every=0, build_threads=1)
    m.start(0)
    try:
        train(clf, m, range(0, 2))
        m.on_step_start(100)
        m.wait(100)
        assert m.failures == 0
        pid, folder = m.worker.pid, m.worker.tmpdir
        deadline = time.monotonic() + 10  # the reply goes before the index is dropped
        while _mapped_files(pid, folder) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _mapped_files(pid, folder) == []
        out = clf(torch.randn(B, D), torch.arange(B))  # the trainer's mapping serves on
        assert out.active.ids.numel() == M and clf.sampler.index.get_n_items() == N
    finally:
        m.close()
