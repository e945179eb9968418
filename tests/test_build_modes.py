"""Every index sampler under every build mode and query mode, the way a run uses them: a real
classifier trained for a few steps, rebuilds on the schedule swapped in, the selection served
from the index or table they made. (Two combinations once failed at the first step: ``auto``
and ``faiss`` with ``background=process``.)"""

from __future__ import annotations

import pytest
import torch

from hf_softmax.index_maintainer import IndexMaintainer
from tests.test_index_maintainer import B, D, N, make, train

KNOBS = {
    "exact": {},
    "annoy": {"ntrees": 2, "n_jobs": 1},
    "hnsw": {"num_threads": 1},
    "faiss": {"threads": 1},
    "auto": {"exact_max_elements": 0, "ntrees": 2, "n_jobs": 1},  # an index at this N
}


@pytest.mark.parametrize("query", ["feature", "label"])
@pytest.mark.parametrize("background", [False, "thread", "process"])
@pytest.mark.parametrize("name", list(KNOBS))
def test_every_sampler_builds_rebuilds_and_serves(name, background, query):
    clf = make(name, query=query, table_k=4, **KNOBS[name])
    race = {"target_recall": 0.5} if name == "auto" else {}  # auto races annoy and faiss
    m = IndexMaintainer(clf, interval=3, background=background, probe_every=2,
                        build_threads=1, **race)  # fmt: skip
    try:
        m.start(0)
        train(clf, m, range(0, 7))  # rebuilds due at steps 3 and 6
        m.wait(7)
        # the first build and at least one rebuild (a background one due while another runs
        # is skipped: these steps are faster than a build)
        assert m.failures == 0 and m.builds + m.refreshes >= 2, m.records()
        sampler = clf.sampler
        if query == "label":
            assert sampler.table is not None and sampler.table.shape == (N, 4)
        if name == "auto":
            assert sampler.kind in ("annoy", "faiss") and len(sampler.race_entries) == 2
        out = clf(torch.randn(B, D), torch.arange(B))
        assert out.active.num_index > 0 and sampler.num_fallbacks == 0
    finally:
        m.close()


def test_stall_and_index_cost_benchmarks_refresh_hnsw():
    """The benchmarks that time hnsw refreshes run them the way training does: the spare graph
    made before the steps, feature-mode ``process`` run (and labelled) as a thread."""
    import numpy as np

    from bench.build_stall import stall
    from bench.index_cost import run

    w = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32) * 0.05
    for mode, where in (("thread", "thread"), ("process", "process: a thread")):
        res = stall("hnsw", w, mode, 1, refresh=True, batch=16, num=50, baseline_steps=3,
                    num_threads=1)  # fmt: skip
        assert res["kind"] == "refresh" and res["mode"] == where and res["steps_during"] >= 1
    rows = [r for r in run(sizes=[2000], dim=16)["rows"] if r["index"].startswith("hnsw")]
    assert [r["op"] for r in rows][1:] == [f"refresh {f}% of rows" for f in (1, 10, 15, 30)]
    assert all(r["recall"] >= 0.9 for r in rows)


def test_stall_times_a_label_build_of_the_table_alone():
    """``bench.build_stall --queries label --table-trees 2``: the worker builds the table from
    projection trees and no index; the row says which selection it timed."""
    import numpy as np

    from bench.build_stall import stall
    from bench.stall_report import summary

    w = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32) * 0.05
    res = stall("annoy", w, "process", 1, batch=16, num=50, baseline_steps=3, query="label",
                table_trees=2, n_jobs=1)  # fmt: skip
    assert res["query"] == "label, table_trees 2" and res["kind"] == "build"
    assert res["mode"] == "process" and res["steps_during"] >= 1
    assert 0 <= res["longest_steal_s"] <= res["steal_during_s"]  # the VM's share, recorded
    assert 0 < res["max_less_steal_s"] <= res["max_during_s"]
    assert res["worker_memory"] == "keep" and res["worker_rss_mib"] > 0  # the default, resident
    table = summary([{**res, "repeat": 0}])
    assert "| label, table_trees 2 | process, memory: keep |" in table
    assert table.splitlines()[0].endswith("| worker resident after |")


def test_stall_knobs_go_to_every_index_or_to_the_one_named():
    """``bench.build_stall --knobs nprobe=1 faiss:m=16``: "key=value" for every index,
    "index:key=value" for that index alone; values read as YAML; a malformed item exits."""
    from bench.build_stall import knob, knobs_for

    extra = dict(map(knob, ["faiss:nprobe=1", "search_k=-1", "faiss:index=ivf"]))
    assert knobs_for("faiss", extra) == {"nprobe": 1, "search_k": -1, "index": "ivf"}
    assert knobs_for("annoy", extra) == {"search_k": -1}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        knob("nprobe")


def test_stall_summary_gives_each_setting_its_median_and_range():
    """``bench.build_stall --repeat``: one line per N and build threads over the runs."""
    from bench.stall_report import summary

    base = {"N": 100_000, "index": "annoy", "mode": "process", "build_s": 6.0,
            "median_during_s": 0.04, "control_max_over_median": 1.4}  # fmt: skip
    rows = [{**base, "build_threads": t, "max_over_median": v}
            for t, v in ((2, 3.0), (1, 2.2), (2, 1.8), (1, 2.1), (2, 2.4))]  # fmt: skip
    lines = summary(rows).splitlines()
    assert len(lines) == 4  # header, rule, one line per setting
    assert "| 2 | 3 | 2.40 (1.80–3.00) |" in lines[2]
    assert "| 1 | 2 | 2.15 (2.10–2.20) |" in lines[3]


def test_label_speed_times_every_mode_on_shuffled_rows_and_says_how():
    """``bench.label_speed --rows shuffled``: W's rows in a random order (as a trained
    model's), every mode timed on them, the row order recorded and in the rendered command."""
    from bench.label_speed import run_size
    from bench.label_speed_report import _label_command

    res = run_size(2000, 16, 32, 50, 5, full_max=2000, exact_max=0, table_rows=100,
                   shares=[0.25], row_order="shuffled")  # fmt: skip
    assert res["row_order"] == "shuffled"
    assert set(res["modes"]) == {"random", "label_annoy", "feature_annoy", "mixed0.25_annoy",
                                 "full"}  # fmt: skip
    assert res["modes"]["label_annoy"]["table_s"] > 0 and res["modes"]["random"]["steps"] == 3
    command = _label_command({"sizes": [2000], "full_max": 1, "rows": "shuffled"})
    assert command.endswith("--full-max 1 --rows shuffled")


def test_label_speed_adds_faiss_rows_with_each_querys_recall():
    """``bench.label_speed --faiss-nprobes 1 2 --recall-batches 2``: one faiss ivf index
    queried per feature at each nprobe, every per-feature mode's recall against exact top-k
    recorded and rendered as a column."""
    from bench.label_speed import run_size
    from bench.label_speed_report import label_speed_section

    res = run_size(3000, 16, 32, 50, 4, full_max=0, exact_max=0, table_rows=100, shares=[],
                   faiss_nprobes=(1, 2), recall_batches=2)  # fmt: skip
    modes = res["modes"]
    assert {"feature_faiss_np1", "feature_faiss_np2"} <= set(modes)
    assert modes["feature_faiss_np1"]["build_s"] == modes["feature_faiss_np2"]["build_s"] > 0
    assert res["recall"]["queries"] == 64 and res["recall"]["k"] == [2]  # ceil(~18 / 32) + 1
    for mode in ("feature_annoy", "feature_faiss_np1", "feature_faiss_np2"):
        assert 0 < modes[mode]["recall"] <= 1
    assert modes["feature_faiss_np1"]["recall"] <= modes["feature_faiss_np2"]["recall"]
    assert "recall" not in modes["label_annoy"] and "recall" not in modes["random"]
    args = {"sizes": [3000], "faiss_nprobes": [1, 2], "recall_batches": 2}
    text = "\n".join(label_speed_section({"args": args, "results": [res]}))
    assert "--faiss-nprobes 1 2 --recall-batches 2" in text and "| recall@2 |" in text


def test_table_cost_compares_the_index_table_with_the_cell_table():
    """``bench.table_cost``: the annoy index's table and ``table_trees`` tables timed and
    scored against the exact neighbours, rendered as one table."""
    from bench.table_cost import render, run_size

    rows = run_size(3000, 16, 8, [1, 3], probes=100)
    assert [r["source"] for r in rows] == ["annoy index (10 trees)", "table_trees=1",
                                           "table_trees=3"]  # fmt: skip
    assert rows[0]["index_s"] > 0 and rows[1]["index_s"] is None
    assert 0 < rows[1]["recall"] < rows[2]["recall"] <= 1  # more trees, more of the exact ones
    data = {"args": {"d": 16, "k": 8, "probe": 100}, "command": "python -m bench.table_cost",
            "machine": {"torch_threads": 1}, "results": rows}  # fmt: skip
    text = "\n".join(render(data))
    assert "| 3,000 | table_trees=3 |" in text and "recall@8" in text
    tree = f"{rows[2]['table_s']:.1f}"
    assert f"| table_trees=3 | – | {tree} | {tree} |" in text  # no index: the table alone
