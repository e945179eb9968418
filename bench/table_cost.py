"""What label mode's class table costs, and how much of the exact table it finds: built from
the annoy index (N queries by item id after the build) against built from ``table_trees``
random-projection trees (``hf_softmax/cell_table.py``, no index).

W's rows are the synthetic families, shuffled (a trained model's class ids say nothing of
where its rows lie); recall@K is against the exact K nearest other rows of ``--probe`` rows
drawn at random (a dense matmul). Build threads: annoy ``n_jobs`` = torch's threads.

    python -m bench.table_cost --sizes 100000 1000000 --trees 2 4

Writes docs/bench/table_cost.json; ``python -m bench.all --reuse`` renders it into
docs/benchmarks.md ("Class table from projection cells").
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import torch

from bench.common import family_rows, machine_info, sampler_config, setup_run, write_json
from bench.formatting import markdown_table
from bench.output import read_json
from hf_softmax.cell_table import cell_table
from hf_softmax.class_table import drop_self
from hf_softmax.samplers import build_sampler
from hf_softmax.samplers.exact import exact_topk, recall_at_k

RESULT = "table_cost"


def exact_neighbours(rows: np.ndarray, probe: np.ndarray, k: int) -> np.ndarray:
    """(len(probe), k): each probe row's k nearest other rows by inner product (the exact
    sampler's chunked top-k, the row itself dropped as its table build drops it)."""
    return drop_self(exact_topk(rows, rows[probe], k + 1), probe)


def run_size(n: int, d: int, k: int, trees: list[int], probes: int) -> list[dict[str, Any]]:
    rows = family_rows(n, d)[np.random.default_rng(7).permutation(n)]
    probe = np.random.default_rng(3).choice(n, min(probes, n), replace=False)
    exact = exact_neighbours(rows, probe, k)
    out = []
    cfg = sampler_config("annoy", 1000, query="label", table_k=k, n_jobs=torch.get_num_threads())
    annoy = build_sampler(cfg, n, "ip")
    t0 = time.perf_counter()
    index = annoy.build_index(rows)
    t1 = time.perf_counter()
    table = annoy.build_table(index, rows)
    t2 = time.perf_counter()
    out.append({"N": n, "source": "annoy index (10 trees)", "index_s": t1 - t0,
                "table_s": t2 - t1, "recall": recall_at_k(table[probe], exact)})  # fmt: skip
    del index, table
    for t in trees:
        t0 = time.perf_counter()
        table = cell_table(rows, k, t)
        seconds = time.perf_counter() - t0
        out.append({"N": n, "source": f"table_trees={t}", "index_s": None, "table_s": seconds,
                    "recall": recall_at_k(table[probe], exact)})  # fmt: skip
    return out


def rebuild_s(row: dict[str, Any]) -> float:
    """A rebuild's seconds: the index then its table, or (``table_trees``) the table alone:
    pure label mode builds no index (``Sampler.table_only``)."""
    return (row["index_s"] or 0.0) + row["table_s"]


def render(data: dict[str, Any] | None = None) -> list[str]:
    data = data or read_json(RESULT)
    if not data:
        return []
    args = data["args"]
    fmt = {"s": lambda v: "–" if v is None else f"{v:.1f}", "r": lambda v: f"{v:.3f}"}
    cols = [("N", "N", lambda v: f"{v:,}"), ("source", "table from", None),
            ("index_s", "index build s", fmt["s"]), ("table_s", "table s", fmt["s"]),
            ("total_s", "rebuild s", fmt["s"]),
            ("recall", f"recall@{args['k']}", fmt["r"])]  # fmt: skip
    return [
        f"Command: `{data['command']}` (D = {args['d']}, K = {args['k']}, family rows shuffled, "
        f"recall against the exact K nearest other rows of {args['probe']} random rows; "
        f"{data['machine'].get('torch_threads')} torch threads, annoy's build and table on as "
        "many). In label mode only the table serves the step; `table_trees` builds it without "
        "the index, so a rebuild in label mode with no `feature_share` builds no index "
        "(`Sampler.table_only`): its rebuild is the table alone.",
        "",
        markdown_table([{**r, "total_s": rebuild_s(r)} for r in data["results"]], cols),
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--k", type=int, default=16, help="table_k")
    p.add_argument("--trees", type=int, nargs="+", default=[2, 4], help="table_trees values")
    p.add_argument("--probe", type=int, default=500, help="rows whose recall is measured")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=RESULT)
    args = p.parse_args(argv)
    setup_run(args.threads)
    results = [r for n in args.sizes for r in run_size(n, args.d, args.k, args.trees, args.probe)]
    words = argv if argv is not None else sys.argv[1:]
    command = "python -m bench.table_cost " + " ".join(words)
    data = {"machine": machine_info(), "args": vars(args), "command": command, "results": results}
    write_json(args.out, data)
    print("\n".join(render(data)))
    return data


if __name__ == "__main__":
    main()
