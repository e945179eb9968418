"""``sampler=auto``: the backend is chosen before the first build (also for a build worker),
raced against faiss when a target recall is set (``samplers/race.py``) and kept across a
resume; faiss indexes travel from a build worker."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import yaml

from hf_softmax.build_worker import sampler_spec
from hf_softmax.classifier import SampledClassifier
from hf_softmax.heads import LinearHead
from hf_softmax.index_maintainer import IndexMaintainer
from hf_softmax.samplers import build_sampler
from hf_softmax.samplers.race import RaceEntry, better, race
from tests.gloo_ranks import spawn_ranks
from tests.test_label_selection import CONF, clustered
from tests.test_train import compose_cfg, train_script


def auto(n, num=60, **knobs):
    cfg = yaml.safe_load((CONF / "auto.yaml").read_text())
    cfg.update({"num": num, "exact_max_elements": 0, **knobs})  # an index at any N
    return build_sampler(cfg, n, "ip", seed=0)


def exact_others(rows, ids, k):
    """Slow, obvious reference: each row's k nearest *other* rows by inner product."""
    scores = rows[ids] @ rows.T
    scores[np.arange(len(ids)), ids] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def test_race_measures_recall_against_exact_top_k_and_keeps_the_cheaper_index():
    rows = clustered(3000, 32, 60)
    sampler = auto(3000)
    candidates = {"annoy": sampler.candidate("annoy"), "faiss": sampler.candidate("faiss")}
    winner, index, entries = race(candidates, rows, 0.95, 10, queries=128, seed=3)
    assert [e.name for e in entries] == ["annoy", "faiss"]
    ids = np.sort(np.random.default_rng(3).choice(3000, size=128, replace=False))
    truth = exact_others(rows, ids, 10)
    for e in entries:
        backend = candidates[e.name]
        assert backend.effort == e.effort  # each candidate is left at its tuned effort
        efforts = [t[0] for t in e.tried]
        assert efforts[0] == backend.default_effort(10)
        steps = zip(efforts, efforts[1:], strict=False)
        assert all(b == 2 * a or b == backend.num_classes for a, b in steps)
        assert all(r < 0.95 for _, r, _ in e.tried[:-1])  # stopped at the first effort reaching it
        assert e.recall >= 0.95 or efforts[-1] >= backend.num_classes or len(efforts) > 10
        # the recall is that of the index at that effort, against the reference
        found = backend.query_rows(backend.build_index(rows), rows, ids, 11)
        hits = [len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True)]
        assert e.recall == pytest.approx(sum(hits) / truth.size, abs=0.02)
    first, second = entries
    assert winner == ("faiss" if better(second, first, 0.95) else "annoy")
    # one index alive at a time: the last candidate's comes back when it wins
    if winner == "faiss":
        assert type(index).__module__.startswith("faiss") and index.ntotal == 3000
    else:
        assert index is None


def test_the_first_candidate_stays_unless_another_is_strictly_cheaper_at_the_target():
    def entry(name, recall, ms):
        return RaceEntry(name, 1.0, 1, recall, ms, [])

    annoy = entry("annoy", 0.95, 1.0)
    assert not better(entry("faiss", 0.96, 1.0), annoy, 0.9)  # a tie keeps annoy
    assert better(entry("faiss", 0.91, 0.5), annoy, 0.9)  # cheaper at the target
    assert not better(entry("faiss", 0.85, 0.1), annoy, 0.9)  # cheap but misses the target
    low = entry("annoy", 0.5, 0.1)
    assert better(entry("faiss", 0.95, 9.0), low, 0.9)  # only faiss reaches it
    assert better(entry("faiss", 0.6, 9.0), low, 0.9)  # neither: the higher recall
    with pytest.raises(ValueError, match="candidates must be"):
        auto(100, candidates=["annoy", "scann"])
    with pytest.raises(ValueError, match=r"unknown faiss knob\(s\) \['nprob'\]"):
        auto(100, faiss={"nprob": 32})


def test_auto_without_a_target_recall_says_it_serves_annoy_unraced(caplog):
    """Above exact_max_elements with no target_recall, ``auto`` serves its first candidate
    at the default effort and says so, and how to race; in exact range it says nothing of it."""
    rows = clustered()
    caplog.set_level(logging.INFO, logger="hf_softmax")
    large = auto(600, exact_max_elements=0, ntrees=4)
    assert large.prepare(rows.shape, lambda: rows) is None and large.kind == "annoy"
    assert "no race" in caplog.text and "set target_recall" in caplog.text
    caplog.clear()
    small = auto(600, exact_max_elements=10**9, ntrees=4)
    assert small.prepare(rows.shape, lambda: rows) is None and small.kind == "exact"
    assert "sampler 'auto': exact" in caplog.text and "no race" not in caplog.text


@pytest.mark.parametrize("limit", [0, 10**9], ids=["annoy", "exact"])
def test_auto_chooses_before_a_build_worker_starts(limit):
    """Regression: with background=process the worker got ``auto`` itself and the trainer's
    ``auto`` never chose, so the first select failed ("query before the first build")."""
    rows = torch.from_numpy(clustered())
    sampler = auto(600, exact_max_elements=limit, ntrees=4)
    clf = SampledClassifier(600, 16, LinearHead(), sampler, weight=rows.clone())
    maint = IndexMaintainer(clf, interval=2, background="process", build_threads=1)
    try:
        maint.start(0)
        assert sampler.kind == ("annoy" if limit == 0 else "exact")
        assert sampler_spec(sampler, 1)[0] is type(sampler.builder)
        labels = torch.arange(0, 600, 25)
        active = sampler.select(rows[labels], labels)
        assert active.num_index > 0 and len(active.ids) == 60
    finally:
        maint.close()


def maintained(rows, **knobs):
    sampler = auto(len(rows), ntrees=4)
    clf = SampledClassifier(len(rows), rows.shape[1], LinearHead(), sampler,
                            weight=torch.from_numpy(rows.copy()))  # fmt: skip
    return sampler, IndexMaintainer(clf, interval=5, probe_every=1, **knobs)


def test_a_target_recall_races_once_and_a_resume_keeps_the_choice():
    rows = clustered(2000, 32, 40)
    sampler, maint = maintained(rows, background=False, target_recall=0.95)
    maint.start(0)
    assert [e.name for e in sampler.race_entries] == ["annoy", "faiss"]
    assert sampler.kind in ("annoy", "faiss") and maint.builds == 1
    state = maint.state_dict()
    assert state["sampler_choice"] == {"backend": sampler.kind, "effort": sampler.effort}
    # a resumed run: the checkpoint's backend at its effort, no second race
    resumed, again = maintained(rows, background=False, target_recall=0.95)
    again.load_state_dict(state)
    again.start(0)
    assert resumed.race_entries == [] and resumed.kind == sampler.kind
    assert resumed.effort == sampler.effort
    # an old checkpoint (no choice) or no target: no race, the first candidate
    old = {k: v for k, v in state.items() if k != "sampler_choice"}
    plain, m = maintained(rows, background=False)
    m.load_state_dict(old)
    m.start(0)
    assert plain.kind == "annoy" and plain.race_entries == []


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_faiss_builds_in_a_worker_process(kind):
    rows = torch.from_numpy(clustered(2000, 32, 40))
    sampler = build_sampler({**yaml.safe_load((CONF / "faiss.yaml").read_text()),
                             "num": 60, "index": kind}, 2000, "ip", seed=0)  # fmt: skip
    cls, kwargs = sampler_spec(sampler, 1)
    assert kwargs["index"] == kind and kwargs["device"] == "cpu" and kwargs["threads"] == 1
    clf = SampledClassifier(2000, 32, LinearHead(), sampler, weight=rows.clone())
    maint = IndexMaintainer(clf, interval=2, background="process", build_threads=1)
    try:
        maint.start(0)
        assert type(sampler.index).__module__.startswith("faiss")
        assert sampler.index.ntotal == 2000
        found = sampler.query(rows[:50].numpy(), 5)
        truth = np.argsort(-(rows[:50] @ rows.T).numpy(), axis=1)[:, :5]
        pairs = zip(found.tolist(), truth.tolist(), strict=True)
        hits = sum(len(set(f) & set(t)) for f, t in pairs)
        assert hits / truth.size > 0.8
    finally:
        maint.close()


def test_train_races_in_a_worker_run_and_resumes_with_the_choice(tmp_path, caplog):
    """A real Trainer: ``auto`` above exact_max_elements, a target recall, process builds;
    the resumed run builds the checkpoint's backend."""
    common = ["sampler.exact_max_elements=1000", "callbacks.index_rebuild.background=process",
              "callbacks.index_rebuild.target_recall=0.9", "callbacks.index_rebuild.probe_every=4",
              "trainer.limit_val_batches=0", "data.val_fraction=0.0",
              "scheduler.total_steps=16"]  # fmt: skip
    runs = tmp_path / "runs"
    caplog.set_level(logging.INFO, logger="hf_softmax")
    train_script.train(compose_cfg(common + ["trainer.max_epochs=1"], runs / "first", runs))
    assert "race for recall@10 >= 0.9" in caplog.text
    caplog.clear()
    train_script.train(
        compose_cfg(common + ["trainer.max_epochs=2", "ckpt_path=last"], runs / "second", runs)
    )
    choices = [
        torch.load(runs / run / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"][
            "IndexRebuild"]["sampler_choice"] for run in ("first", "second")
    ]  # fmt: skip
    assert choices[0] is not None and choices[0]["backend"] in ("annoy", "faiss")
    assert choices[1]["backend"] == choices[0]["backend"]
    assert "as in the checkpoint" in caplog.text
    assert "race for" not in caplog.text


def test_the_race_benchmark_runs_the_real_sampler(tmp_path):
    from bench import auto_race

    data = auto_race.main(["--sizes", "3000", "--d", "32", "--target", "0.9",
                           "--out", str(tmp_path / "race")])  # fmt: skip
    (result,) = data["results"]
    assert [e["name"] for e in result["entries"]] == ["annoy", "faiss"]
    assert result["winner"] in ("annoy", "faiss") and (tmp_path / "race.json").is_file()
    for e in result["entries"]:
        hit = auto_race.first_reaching(e, 0.9)
        assert hit is None or hit["recall"] >= 0.9


def test_the_faiss_knob_list_matches_the_sampler():
    import inspect

    from hf_softmax.samplers.faiss import FAISS_KNOBS, FaissSampler

    params = list(inspect.signature(FaissSampler.__init__).parameters)
    assert tuple(params[params.index("seed") + 1 : params.index("selection")]) == FAISS_KNOBS


def _rank_worker(rank: int, out: str) -> None:
    """One of two gloo ranks: rank 0's auto chooses annoy, rank 1's faiss (different
    candidates, as a race could decide on two machines); both must serve rank 0's."""
    rows = clustered(600, 16, 30)
    sampler = auto(600, ntrees=2, candidates=[["annoy", "faiss"], ["faiss", "annoy"]][rank])
    clf = SampledClassifier(600, 16, LinearHead(), sampler, weight=torch.from_numpy(rows))
    maint = IndexMaintainer(clf, interval=5, background=False, probe_every=0)
    maint.start(0)
    seen = {"kind": sampler.kind, "index": type(sampler.index).__name__,
            "choice": maint.state_dict()["sampler_choice"]}  # fmt: skip
    torch.save(seen, f"{out}/{rank}.pt")


def test_every_ddp_rank_serves_rank_0s_choice(tmp_path):
    spawn_ranks(_rank_worker, str(tmp_path))
    first, second = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert first["kind"] == second["kind"] == "annoy"
    assert second["index"] == first["index"] == "Annoy" and second["choice"] == first["choice"]
