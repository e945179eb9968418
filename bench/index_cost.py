"""Index cost: build / refresh time and recall@k against exact, and background-build stalls.

- annoy with ntrees in {10, 50, 100}: build time, query time (B = 256), recall@k;
- hnsw: full build, then incremental ``refresh`` after 1%, 10%, 15% and 30% of the rows
  moved (recall against exact top-k of the *moved* weights, next to the stale index's
  recall; where a refresh costs a full build: the sampler's ``refresh_fraction``);
- background rebuild (``bench.build_stall``): the real ``IndexMaintainer`` rebuilding in a
  thread while the main thread keeps taking real training steps of the real
  ``SampledClassifier``; the longest step while the build ran against the median step.

Weights: families of nearby class vectors (``bench.common.family_rows``); queries: features
near the rows of random labels. N up to 10^6 (full mode), 10^5 with ``--quick``.

    python -m bench.index_cost --quick
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any

# Before torch loads OpenMP (see bench.head_speed).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from bench.build_stall import stall  # noqa: E402
from bench.common import (  # noqa: E402
    RunClock,
    family_rows,
    features_near,
    fmt_count,
    fmt_seconds,
    free_memory,
    markdown_table,
    pyplot,
    sampler_config,
    save_figure,
    setup_run,
    write_json,
)
from bench.stall_report import COLUMNS as STALL_COLUMNS  # noqa: E402
from hf_softmax.samplers import build_sampler, exact_topk, recall_at_k  # noqa: E402

log = logging.getLogger("bench.index_cost")

METRIC = "ip"  # the linear head's metric (bench.head_speed uses the linear head too)


def _queries(w: np.ndarray, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, w.shape[0], count)
    return np.ascontiguousarray(features_near(w, labels, noise=0.5, rng=rng))


def _time_query(sampler: Any, q: np.ndarray, k: int, repeats: int = 3) -> tuple[float, np.ndarray]:
    times, found = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        found = sampler.query(q, k)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), found


def annoy_rows(w: np.ndarray, q: np.ndarray, truth: np.ndarray, k: int, ntrees_list) -> list:
    rows = []
    for ntrees in ntrees_list:
        s = build_sampler(sampler_config("annoy", 1000, ntrees=ntrees), w.shape[0], METRIC)
        t0 = time.perf_counter()
        s.swap(s.build_index(w))
        build = time.perf_counter() - t0
        qt, found = _time_query(s, q, k)
        rows.append(
            {
                "index": f"annoy ntrees={ntrees}",
                "N": w.shape[0],
                "op": "full build",
                "seconds": build,
                "query_s": qt,
                "recall": recall_at_k(found, truth),
            }
        )
        log.info("%s", rows[-1])
        del s
        free_memory()
    return rows


def hnsw_rows(
    w: np.ndarray, q: np.ndarray, truth: np.ndarray, k: int, fractions, seed: int = 0
) -> list:
    n = w.shape[0]
    # every fraction a real refresh (the sampler's default turns large ones into full builds:
    # these rows show where that pays)
    s = build_sampler(sampler_config("hnsw", 1000, refresh_fraction=1.0), n, METRIC)
    t0 = time.perf_counter()
    s.swap(s.build_index(w))
    build = time.perf_counter() - t0
    qt, found = _time_query(s, q, k)
    knobs = f"m={s.m}, ef_construction={s.ef_construction}, ef={s.ef}"
    rows = [
        {
            "index": f"hnsw {knobs}",
            "N": n,
            "op": "full build",
            "seconds": build,
            "query_s": qt,
            "recall": recall_at_k(found, truth),
        }
    ]
    log.info("%s", rows[-1])
    base_index = s.index
    rng = np.random.default_rng(seed + 7)
    for frac in fractions:
        changed = np.sort(rng.choice(n, int(frac * n), replace=False))
        moved = w.copy()
        # a training-like move: each changed row drifts by ~50% of its norm
        step = rng.standard_normal((changed.size, w.shape[1]), dtype=np.float32)
        step *= 0.5 * np.linalg.norm(w[changed], axis=1, keepdims=True) / np.sqrt(w.shape[1])
        moved[changed] += step
        # queries where training is: features of the classes whose rows moved
        labels = rng.choice(changed, q.shape[0])
        q = np.ascontiguousarray(features_near(moved, labels, noise=0.5, rng=rng))
        truth2 = exact_topk(moved, q, k, METRIC)
        s.swap(base_index)
        s.ready_for_refresh()  # the spare graph the refresh updates (a copy, not timed)
        stale = recall_at_k(s.query(q, k), truth2)
        t0 = time.perf_counter()
        fresh = s.refresh(moved, changed)
        seconds = time.perf_counter() - t0
        s.swap(fresh)
        qt, found = _time_query(s, q, k)
        rows.append(
            {
                "index": f"hnsw {knobs}",
                "N": n,
                "op": f"refresh {frac:.0%} of rows",
                "seconds": seconds,
                "query_s": qt,
                "recall": recall_at_k(found, truth2),
                "stale_recall": stale,
            }
        )
        log.info("%s", rows[-1])
        del moved, fresh
        free_memory()
    del s
    free_memory()
    return rows, base_index


REFRESH_FRACTIONS = (0.01, 0.10, 0.15, 0.30)  # hnsw refreshes timed against its full build


def run(quick: bool = False, sizes: list[int] | None = None, dim: int = 256) -> dict[str, Any]:
    sizes = sizes or ([100_000] if quick else [100_000, 1_000_000])
    k = 10
    clock = RunClock()
    rows: list[dict[str, Any]] = []
    background: list[dict[str, Any]] = []
    for n in sizes:
        w = family_rows(n, dim, scale=0.05)
        q = _queries(w, 256, seed=11)
        truth = exact_topk(w, q, k, METRIC)
        t0 = time.perf_counter()
        exact = build_sampler(sampler_config("exact", 1000), n, METRIC)
        exact.swap(exact.build_index(w))
        eb = time.perf_counter() - t0
        qt, found = _time_query(exact, q, k)
        rows.append(
            {
                "index": "exact (copy of W)",
                "N": n,
                "op": "full build",
                "seconds": eb,
                "query_s": qt,
                "recall": recall_at_k(found, truth),
            }
        )
        del exact
        rows += annoy_rows(w, q, truth, k, (10, 50, 100))
        hrows, hnsw_index = hnsw_rows(w, q, truth, k, REFRESH_FRACTIONS)
        rows += hrows
        if n == sizes[-1]:
            background.append(stall("annoy", w))
            background.append(stall("hnsw", w, refresh=True, prebuilt=hnsw_index))
        del hnsw_index
        del w
        free_memory()
    return {
        "rows": rows,
        "background": background,
        "meta": clock.meta(quick=quick, dim=dim, k=k, queries=256, metric=METRIC),
    }


def render(data: dict[str, Any]) -> str:
    meta = data["meta"]
    cols = [
        ("N", "N", fmt_count),
        ("index", "index", None),
        ("op", "operation", None),
        ("seconds", "time", fmt_seconds),
        ("query_s", "query (256 features)", fmt_seconds),
        ("recall", f"recall@{meta['k']}", lambda x: f"{x:.3f}"),
        ("stale_recall", "recall before refresh", lambda x: f"{x:.3f}"),
    ]
    plot_path = plot(data["rows"])
    return "\n".join(
        [
            f"D = {meta['dim']}, metric `{meta['metric']}`, {meta['queries']} query features "
            f"near random classes, recall@{meta['k']} against `exact_topk`. Refresh rows: the "
            f"changed rows drift by ~50% of their norm and the queries are features of those "
            f"classes; *recall before refresh* is the stale index against the moved weights. "
            f"Torch threads {meta['torch_threads']}.",
            "",
            markdown_table(data["rows"], cols),
            "",
            "Background rebuild (the real `IndexMaintainer`, a build thread; the main thread "
            "keeps taking real B = 256, M = 1000 steps; the step that triggers the rebuild "
            "includes the weight snapshot, the step that swaps includes the swap; the hnsw "
            "refresh re-inserts the rows the 33 steps before it updated):",
            "",
            markdown_table(data["background"], STALL_COLUMNS),
            "",
            f"![recall vs build time]({plot_path.name})",
        ]
    )


def plot(rows: list[dict[str, Any]]):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["op"] != "full build":
            continue
        ax.scatter(r["seconds"], r["recall"], label=f"{r['index']} N={fmt_count(r['N'])}")
    ax.set_xscale("log")
    ax.set_xlabel("build time (s)")
    ax.set_ylabel("recall@k vs exact")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, "index_cost.png")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N = 1e5 only")
    p.add_argument("--n", type=int, nargs="+", help="override the sizes")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", default="index_cost")
    args = p.parse_args(argv)
    setup_run(args.threads)
    data = run(quick=args.quick, sizes=args.n, dim=args.d)
    write_json(args.out, data)
    print(render(data))
    return data


if __name__ == "__main__":
    main()
