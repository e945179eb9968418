"""Sampler invariants for every kind, ANN recall against exact top-k, hnsw refresh, faiss."""

import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from hf_softmax.samplers import (
    build_sampler,
    exact_topk,
    recall_at_k,
    sampler_class,
    sampler_names,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "sampler"
# every sampler with a YAML: a new sampler is tested without touching this file
KINDS = {p.stem: sampler_class(yaml.safe_load(p.read_text())) for p in sorted(CONF.glob("*.yaml"))}
SAMPLED = [name for name, cls in KINDS.items() if not cls.dense]
INDEXED = [name for name, cls in KINDS.items() if cls.needs_index]


def clustered(n=3000, d=32, clusters=60, seed=0):
    """Rows around cluster centres (hard negatives), plus queries near random rows."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)).astype(np.float32)
    rows = centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, d))
    labels = rng.integers(0, n, 64)
    queries = rows[labels] + 0.1 * rng.normal(size=(64, d))
    return rows.astype(np.float32), torch.from_numpy(queries.astype(np.float32)), labels


def make(name, n, num, metric="ip", **knobs):
    cfg = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    cfg.update(num=num, **knobs)
    return build_sampler(cfg, num_classes=n, metric=metric, seed=0)


def check_invariants(active, labels, n, m):
    ids = active.ids
    assert ids.dtype == torch.int64 and ids.shape == (m,)
    assert torch.unique(ids).numel() == m
    assert int(ids.min()) >= 0 and int(ids.max()) < n
    positives = torch.unique(torch.as_tensor(labels))
    assert active.num_positives == positives.numel()
    assert torch.equal(ids[: active.num_positives], positives)  # positives first
    assert active.targets.dtype == torch.int64
    assert torch.equal(ids[active.targets], torch.as_tensor(labels, dtype=torch.int64))


@pytest.mark.parametrize("metric", ["ip", "cosine"])
@pytest.mark.parametrize("name", SAMPLED)
def test_select_invariants(name, metric):
    rows, feats, labels = clustered(n=800, d=16)
    labels = torch.from_numpy(labels[:24])
    labels[5] = labels[0]  # duplicate labels share a target
    sampler = make(name, 800, 200, metric)
    if sampler.needs_index:
        sampler.swap(sampler.build_index(rows))
    for _ in range(3):
        check_invariants(sampler.select(feats[:24], labels), labels, 800, 200)


def test_full_sampler_is_identity():
    sampler = make("full", 50, 10)
    assert sampler.dense and not sampler.needs_index
    labels = torch.tensor([3, 3, 7])
    active = sampler.select(torch.zeros(3, 4), labels)
    assert torch.equal(active.ids, torch.arange(50)) and torch.equal(active.targets, labels)
    assert active.num_positives == 2


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_neighbours_rank_major_dedup_then_fill(metric):
    """exact index: ids after the positives are the rank-major, deduplicated true neighbours."""
    rows, feats, labels = clustered(n=500, d=8)
    labels = torch.from_numpy(labels[:10])
    m = 60
    sampler = make("exact", 500, m, metric, chunk_size=97)
    sampler.swap(sampler.build_index(rows))
    active = sampler.select(feats[:10], labels)
    check_invariants(active, labels, 500, m)
    p = active.num_positives
    k = math.ceil((m - p) / 10) + 1
    nbrs = exact_topk(rows, feats[:10].numpy(), k, metric)
    expected = []
    for c in nbrs.T.reshape(-1).tolist():
        if c not in expected and c not in labels.tolist():
            expected.append(c)
    expected = expected[: m - p]
    assert active.ids[p : p + len(expected)].tolist() == expected
    # duplicates across samples leave room that the random fill completes to exactly M


def test_fill_when_index_returns_few_neighbours():
    rows, feats, labels = clustered(n=400, d=8)
    sampler = make("annoy", 400, 300, ntrees=1, search_k=1)  # tiny search: few results
    sampler.swap(sampler.build_index(rows))
    labels = torch.from_numpy(labels[:4])
    check_invariants(sampler.select(feats[:4], labels), labels, 400, 300)


def test_fill_near_full_and_m_equals_n():
    sampler = make("random", 30, 30)
    labels = torch.tensor([1, 5, 5, 29])
    active = sampler.select(torch.zeros(4, 2), labels)
    check_invariants(active, labels, 30, 30)
    assert sorted(active.ids.tolist()) == list(range(30))


def test_random_fill_at_ten_million_classes_and_uniform():
    n = 10_000_000  # rejection sampling: no O(N) permutation per step
    sampler = make("random", n, 1000)
    labels = torch.randint(0, n, (256,))
    check_invariants(sampler.select(torch.zeros(256, 2), labels), labels, n, 1000)
    small = make("random", 20, 5)
    counts = np.zeros(20)
    for _ in range(1000):
        counts[small.select(torch.zeros(1, 2), torch.tensor([0])).ids[1:].numpy()] += 1
    assert counts[0] == 0
    assert counts[1:].min() > 0.7 * counts[1:].mean()  # every negative drawn about equally


@pytest.mark.parametrize("name", INDEXED)
def test_fallback_to_random_before_first_build_logs_once(name, caplog):
    sampler = make(name, 100, 20)
    labels = torch.tensor([4, 9])
    with caplog.at_level(logging.INFO, logger="hf_softmax.samplers.base"):
        for _ in range(3):
            check_invariants(sampler.select(torch.randn(2, 8), labels), labels, 100, 20)
    assert sampler.num_fallbacks == 3
    assert sum("no index built yet" in r.getMessage() for r in caplog.records) == 1


def test_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"num \(M\) = 200 .*N = 100"):
        make("random", 100, 200)
    sampler = make("random", 100, 3)
    with pytest.raises(ValueError, match=r"M\) = 3 is smaller than the 4 unique"):
        sampler.select(torch.zeros(4, 2), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="labels must be in 0..99"):
        sampler.select(torch.zeros(1, 2), torch.tensor([100]))
    with pytest.raises(ValueError, match="valid names"):
        build_sampler({"name": "lsh", "num": 3}, 10, "ip")
    with pytest.raises(ValueError, match="unknown config keys \\['trees'\\]"):
        build_sampler({"name": "annoy", "num": 3, "trees": 3}, 10, "ip")
    with pytest.raises(ValueError, match="metric"):
        build_sampler({"name": "random", "num": 3}, 10, "l2")


def test_every_config_builds_and_holds_only_its_own_knobs():
    for path in sorted(CONF.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        assert cfg["_partial_"] is True and cfg["num"] == 1000, path.name
        assert not set(cfg) & {"name", "interval", "background", "probe_every", "num_schedule"}
        sampler = build_sampler(cfg, num_classes=5000, metric="cosine", seed=1)
        assert sampler.name == path.stem
        # the partial Hydra makes from the YAML builds the same sampler once N is known
        partial = instantiate(OmegaConf.create(cfg))
        assert type(partial(num_classes=5000, metric="cosine", seed=1)) is type(sampler)
    assert set(sampler_names()) == {p.stem for p in CONF.glob("*.yaml")}  # one YAML per file


def test_state_dict_restores_the_random_stream():
    a = make("random", 1000, 50)
    a.select(torch.zeros(2, 2), torch.tensor([1, 2]))
    state = a.state_dict()
    first = a.select(torch.zeros(2, 2), torch.tensor([1, 2])).ids
    b = make("random", 1000, 50)
    b.load_state_dict(state)
    assert torch.equal(b.select(torch.zeros(2, 2), torch.tensor([1, 2])).ids, first)
    assert b.num_selects == a.num_selects


def test_exact_topk_matches_full_sort_and_pads():
    rows, feats, _ = clustered(n=300, d=8)
    for metric in ("ip", "cosine"):
        w, q = torch.from_numpy(rows), feats
        if metric == "cosine":
            w, q = torch.nn.functional.normalize(w, dim=1), torch.nn.functional.normalize(q, dim=1)
        ref = (q @ w.t()).argsort(dim=1, descending=True)[:, :7].numpy()
        assert np.array_equal(exact_topk(rows, feats, 7, metric, chunk_size=64), ref)
    padded = exact_topk(rows[:5], feats[:2], 8, "ip")
    assert padded.shape == (2, 8) and (padded[:, 5:] == -1).all()
    assert recall_at_k(padded[:, :5], exact_topk(rows[:5], feats[:2], 5, "ip")) == 1.0


@pytest.mark.parametrize("metric", ["ip", "cosine"])
@pytest.mark.parametrize(
    "name,knobs,floor",
    [("annoy", {"ntrees": 20, "search_k": 2000}, 0.8), ("hnsw", {"m": 16, "ef": 64}, 0.9)],
)
def test_ann_recall_at_10_against_exact(name, knobs, floor, metric):
    rows, feats, _ = clustered(n=3000, d=32)
    sampler = make(name, 3000, 100, metric, **knobs)
    sampler.swap(sampler.build_index(rows))
    found = sampler.query(feats.numpy(), 10)
    assert found.shape == (64, 10) and found.dtype == np.int64
    assert recall_at_k(found, exact_topk(rows, feats, 10, metric)) >= floor


def test_hnsw_refresh_in_place_updates_only_changed_rows():
    rows, feats, _ = clustered(n=1000, d=16)
    sampler = make("hnsw", 1000, 50, "ip", refresh_in_place=True)
    old = sampler.build_index(rows)
    sampler.swap(old)
    q = feats[:3].numpy()
    changed = np.array([11, 222, 777])
    new_rows = rows.copy()
    new_rows[changed] = 50.0 * q  # each changed row becomes the top inner product of one query
    assert sampler.refresh(new_rows, changed) is old
    assert sampler.query(q, 1)[:, 0].tolist() == changed.tolist()
    # only the changed rows as input works too, and the other rows are as built
    again = sampler.refresh(new_rows[changed] * 2, changed)
    assert np.allclose(again.get_items([5])[0], rows[5])
    # refreshing more than refresh_fraction of the rows is a full build
    assert sampler.refresh(new_rows, np.arange(400)) is not sampler.index


def test_hnsw_refresh_updates_the_spare_graph_never_a_copy():
    """Two graphs take turns: a refresh brings the one out of service up to date with every
    row it lacks while the serving one stays as it is; swapped or not, each graph's rows
    always end up equal to W (checked row by row against W itself), and after
    ``ready_for_refresh`` no refresh makes a graph (each returns one of the same two)."""
    rng = np.random.default_rng(0)
    n, d = 2000, 16
    w = rng.standard_normal((n, d)).astype(np.float32)
    sampler = make("hnsw", n, 50, "ip", refresh_fraction=1.0)
    sampler.swap(sampler.build_index(w))
    sampler.ready_for_refresh()
    graphs = {id(sampler.index), id(sampler._spare)}
    assert len(graphs) == 2
    everything = np.arange(n)
    for r in range(9):  # the last one is swapped in
        changed = rng.choice(n, 100, replace=False)
        w[changed] = rng.standard_normal((100, d)).astype(np.float32)
        serving = np.asarray(sampler.index.get_items(everything))
        fresh = sampler.refresh(w.copy(), changed)
        assert id(fresh) in graphs and fresh is not sampler.index
        np.testing.assert_array_equal(np.asarray(sampler.index.get_items(everything)), serving)
        np.testing.assert_allclose(np.asarray(fresh.get_items(everything)), w)
        if r % 3 != 1:  # a refresh that is never swapped in (a dropped build) changes nothing
            sampler.swap(fresh)
    q = rng.standard_normal((64, d)).astype(np.float32)
    assert recall_at_k(sampler.query(q, 10), exact_topk(w, torch.from_numpy(q), 10, "ip")) >= 0.9
    # a refresh re-inserting more than refresh_fraction of the rows is a full build
    sampler.refresh_fraction = 0.01
    assert id(sampler.refresh(w, np.arange(100))) not in graphs
    with pytest.raises(ValueError, match="full"):  # the spare needs the whole snapshot
        sampler.refresh(w[:3], np.arange(3))


@pytest.mark.parametrize("metric", ["ip", "cosine"])
@pytest.mark.parametrize(
    "knobs,floor",
    [
        ({"index": "flat"}, 1.0),
        ({"index": "ivf", "nlist": 40, "nprobe": 40}, 1.0),  # every cell scanned: exact
        ({"index": "ivf", "nlist": 40, "nprobe": 4}, 0.7),
        ({"index": "ivf", "nlist": 40, "nprobe": 40, "storage": "sq8"}, 0.9),
        ({"index": "hnsw", "m": 16, "efSearch": 64}, 0.9),
    ],
)
def test_faiss_recall_at_10_against_exact(knobs, floor, metric):
    rows, feats, _ = clustered(n=3000, d=32)
    sampler = make("faiss", 3000, 100, metric, **knobs)
    before = rows.copy()
    sampler.swap(sampler.build_index(rows))
    assert np.array_equal(rows, before)  # the snapshot is never normalised in place
    found = sampler.query(feats.numpy(), 10)
    assert found.shape == (64, 10) and found.dtype == np.int64
    assert sampler.backend == "faiss-cpu" or torch.cuda.is_available()
    assert recall_at_k(found, exact_topk(rows, feats, 10, metric)) >= floor
    # k beyond N pads with -1 like the other indexes
    small = make("faiss", 20, 5, metric, **{**knobs, "nlist": 2, "nprobe": 2})
    small.swap(small.build_index(rows[:20]))
    padded = small.query(feats[:3].numpy(), 25)
    assert padded.shape == (3, 25) and (padded[:, 20:] == -1).all()
    assert sorted(padded[0, :20].tolist()) == list(range(20))


def test_faiss_searches_a_steps_batch_in_blas_with_the_same_ids():
    """faiss-cpu 1.15.1 kept a batch of 256 queries off BLAS (10x slower coarse search at
    10^6 classes); the sampler lowers the switch, and a batch and its queries one by one
    (the other path) find the same exact top-k."""
    from hf_softmax.samplers.faiss import BLAS_THRESHOLD

    rows, _, _ = clustered(n=3000, d=32)
    sampler = make("faiss", 3000, 100, index="flat")
    assert sampler.faiss.cvar.distance_compute_blas_threshold <= BLAS_THRESHOLD
    sampler.swap(sampler.build_index(rows))
    feats = np.random.default_rng(3).standard_normal((256, 32)).astype(np.float32)
    batch = sampler.query(feats, 10)
    assert np.array_equal(np.sort(batch, 1), np.sort(exact_topk(rows, feats, 10), 1))
    one_by_one = np.concatenate([sampler.query(feats[i : i + 1], 10) for i in range(8)])
    assert np.array_equal(np.sort(one_by_one, 1), np.sort(batch[:8], 1))


def test_faiss_effort_knob_and_errors():
    ivf = make("faiss", 3000, 100, index="ivf", nlist=50, nprobe=8)
    assert ivf.effort_knob == "nprobe" and ivf.effort == 8 and ivf.default_effort(10) == 8
    ivf.effort = 32
    assert ivf.nprobe == 32
    hnsw = make("faiss", 3000, 100, index="hnsw", efSearch=16)
    assert hnsw.effort_knob == "efSearch" and hnsw.default_effort(40) == 40
    flat = make("faiss", 3000, 100, index="flat")
    assert flat.effort is None and flat.default_effort(10) is None
    assert make("faiss", 10**6, 100).nlist == 4000  # 4 sqrt(N)
    assert make("faiss", 800, 100).nlist == 800 // 39  # every cell keeps >= 39 training rows
    with pytest.raises(ValueError, match=r"index must be one of .*'lsh'"):
        make("faiss", 100, 10, index="lsh")
    with pytest.raises(ValueError, match="nlist = 500 exceeds num_classes = 100"):
        make("faiss", 100, 10, nlist=500)
    with pytest.raises(ValueError, match="storage must be one of"):
        make("faiss", 100, 10, storage="pq")
    with pytest.raises(ValueError, match="device must be one of"):
        make("faiss", 100, 10, device="tpu")


def test_faiss_state_round_trip_selects_the_same():
    rows, feats, labels = clustered(n=2000, d=16)
    labels = torch.from_numpy(labels[:16])
    a = make("faiss", 2000, 120, random_fraction=0.5, nlist=20, threads=1)
    a.swap(a.build_index(rows))
    a.select(feats[:16], labels)
    state = a.state_dict()
    first = a.select(feats[:16], labels)
    b = make("faiss", 2000, 120, random_fraction=0.5, nlist=20, threads=1)
    b.load_state_dict(state)
    b.swap(b.build_index(rows))  # the index is never in the state: rebuilt after loading
    again = b.select(feats[:16], labels)
    assert torch.equal(again.ids, first.ids) and again.num_index == first.num_index > 0
    assert b.num_selects == a.num_selects


def test_annoy_build_holds_every_row_as_a_plain_build_does():
    """build_index adds the rows in small chunks, handing the GIL over between them: the
    forest is the one annoy builds from the same rows added one by one (same seed)."""
    from annoy import AnnoyIndex

    rows = np.random.default_rng(3).standard_normal((1000, 8)).astype(np.float32)  # 15 chunks + 40
    index = make("annoy", 1000, 50, "ip", ntrees=4, n_jobs=1).build_index(rows)
    plain = AnnoyIndex(8, "dot")
    plain.set_seed(0)
    for i, row in enumerate(rows):
        plain.add_item(i, row.tolist())
    plain.build(4, n_jobs=1)
    assert index.get_n_items() == 1000
    np.testing.assert_allclose([index.get_item_vector(i) for i in (0, 63, 64, 999)],
                               rows[[0, 63, 64, 999]], rtol=1e-6)  # fmt: skip
    for q in rows[:20]:
        assert index.get_nns_by_vector(q.tolist(), 10) == plain.get_nns_by_vector(q.tolist(), 10)


def test_annoy_builds_into_files_and_deletes_the_ones_nothing_serves(tmp_path, caplog):
    """Each build writes its nodes into a new file under ``build_dir``; the next build deletes
    every earlier file but the serving index's; the build worker builds in memory (annoy's
    save of an index built on disk writes nothing); no room for the file: in memory, said
    once."""
    from hf_softmax.build_worker import sampler_spec
    from hf_softmax.samplers.build_files import BuildFiles

    rows = np.random.default_rng(4).standard_normal((500, 8)).astype(np.float32)
    sampler = make("annoy", 500, 20, "ip", ntrees=2, n_jobs=1, build_dir=str(tmp_path))
    names = []
    for _ in range(3):
        index = sampler.build_index(rows)
        files = sorted(p.name for p in tmp_path.glob("*/build-*.ann"))
        names.append(files)
        sampler.swap(index)
    assert names == [["build-1.ann"], ["build-1.ann", "build-2.ann"],
                     ["build-2.ann", "build-3.ann"]]  # fmt: skip
    assert sampler.query(rows[:4], 3).shape == (4, 3)  # served from its file
    assert sampler_spec(sampler, 1)[1]["build_dir"] == "memory"
    dead = tmp_path / "hf_softmax-annoy-999999999-x"  # left by a killed process
    dead.mkdir()
    (dead / "build-1.ann").write_bytes(b"0")
    mine = next(tmp_path.glob(f"hf_softmax-annoy-{os.getpid()}-*"))
    assert BuildFiles(str(tmp_path)).next_path(1000, serving=None) is not None
    assert not dead.exists() and mine.exists()
    files = BuildFiles(str(tmp_path))
    with caplog.at_level("WARNING", logger="hf_softmax.samplers.build_files"):
        assert files.next_path(10**18, serving=None) is None
        assert files.next_path(10**18, serving=None) is None
    assert caplog.text.count("building in memory") == 1


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="Linux: /proc/self/maps")
def test_annoy_swap_unmaps_the_old_index_outside_the_step(tmp_path):
    """A swap hands the index it takes out of service to a thread that drops its page-table
    entries (``release_file_mappings``, GIL released) and then the index; the file's data
    stays mapped where it serves: an index whose entries were dropped answers as before."""
    from hf_softmax.page_release import release_file_mappings
    from hf_softmax.samplers.build_files import BuildFiles

    def mapped() -> set[str]:
        with open("/proc/self/maps") as fh:
            return {line.split(maxsplit=5)[5].rstrip("\n") for line in fh if "build-" in line}

    rows = np.random.default_rng(5).standard_normal((20000, 16)).astype(np.float32)
    sampler = make("annoy", 20000, 20, "ip", ntrees=4, n_jobs=1, build_dir=str(tmp_path))
    sampler.swap(sampler.build_index(rows))
    first = next(tmp_path.glob("*/build-1.ann"))
    before = sampler.query(rows[:50], 5)
    assert release_file_mappings(first) > 0  # entries dropped; the data stays in the file
    assert np.array_equal(sampler.query(rows[:50], 5), before)
    assert release_file_mappings(tmp_path / "nothing-maps-this") == 0
    assert str(first) in mapped()
    sampler.swap(sampler.build_index(rows))
    deadline = time.monotonic() + 10
    while str(first) in mapped() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert str(first) not in mapped()  # dropped by the retiring thread
    assert str(next(tmp_path.glob("*/build-2.ann"))) in mapped()  # serving
    assert np.array_equal(sampler.query(rows[:50], 5), before)  # same seed, same rows
    assert BuildFiles(str(tmp_path)).retire(object()) is None  # not built there: as before
