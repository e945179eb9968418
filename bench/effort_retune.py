"""``target_recall`` after ``auto``'s race on a fresh run: one probe on trained-like rows.

A fresh run races its candidates on the classifier's initial rows (N(0, 0.01): no neighbour
structure), so the effort the winner serves from is near exhaustive. Per N (D = 256):

1. the real ``AutoSampler`` (``conf/sampler/auto.yaml``) races on the initial rows for
   ``--target`` (``prepare``, as the first build of such a run does);
2. the rows take shape: the winner's index is built again over rows in families of near
   neighbours (``bench.synthetic.family_rows``), as the next rebuild would, at the race's
   effort;
3. one fresh probe: the step's k nearest rows of B features near their classes' rows,
   against exact top-k (``recall_probe.measure_recall``), and ``RecallTarget.update``, which
   re-measures at other efforts.

Reported: the effort, recall@k and query time of a batch before and after that probe, and
what the probe cost.

    python -m bench.effort_retune                  # N = 1e5 and 1e6, target 0.9
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench.head_speed

import numpy as np  # noqa: E402

from bench.common import RunClock, family_rows, free_memory, sampler_config, setup_run  # noqa: E402
from bench.formatting import markdown_table  # noqa: E402
from bench.output import write_json  # noqa: E402
from bench.synthetic import features_near  # noqa: E402
from hf_softmax.recall_probe import measure_recall  # noqa: E402
from hf_softmax.recall_target import RecallTarget  # noqa: E402
from hf_softmax.row_store import initial_rows  # noqa: E402
from hf_softmax.samplers import build_sampler  # noqa: E402

log = logging.getLogger("bench.effort_retune")
RESULT = "effort_retune"  # docs/bench/<RESULT>.json


def batch_ms(sampler: Any, feats: np.ndarray, k: int, runs: int = 5) -> float:
    """Median ms of one query batch at the sampler's current effort."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sampler.query(feats, k)
        times.append(1000.0 * (time.perf_counter() - t0))
    return statistics.median(times)


def retune_once(n: int, args: argparse.Namespace) -> dict[str, Any]:
    d, b = args.d, args.batch
    cfg = sampler_config("auto", args.num, candidates=["annoy", "faiss"], exact_max_elements=0)
    sampler = build_sampler(cfg, n, "ip", seed=0)
    init = initial_rows(0, n, n, d, std=0.01, seed=0).numpy()
    t0 = time.perf_counter()
    sampler.prepare(init.shape, lambda: init, args.target)
    race_s = time.perf_counter() - t0
    init = None  # free the initial rows (the race's closure holds the name, not a copy)
    rows = family_rows(n, d, seed=0, scale=0.05)
    sampler.swap(sampler.build_index(rows))  # the next rebuild, at the race's effort
    rng = np.random.default_rng(0)
    labels = rng.integers(n, size=b)
    feats = features_near(rows, labels, 1.0, rng)
    k = math.ceil((args.num - len(np.unique(labels))) / b) + 1  # the step's k
    before = {"effort": sampler.effort, "ms": batch_ms(sampler, feats, k)}
    t0 = time.perf_counter()
    recall, k, recall_at = measure_recall(sampler, rows, feats, probe_k=k)
    target = RecallTarget(args.target)
    action = target.update(sampler, recall, k, 0, recall_at)
    probe_s = time.perf_counter() - t0
    before["recall"] = recall
    after = {"effort": sampler.effort, "recall": recall_at(), "ms": batch_ms(sampler, feats, k)}
    default = sampler.default_effort(k)
    log.info("N = %d: %s, %s %s -> %s after one probe (%s)", n, sampler.kind,
             sampler.backend.effort_knob, before["effort"], after["effort"], action)  # fmt: skip
    return {"n": n, "d": d, "k": k, "winner": sampler.kind, "knob": sampler.backend.effort_knob,
            "default_effort": default, "race_s": race_s, "probe_s": probe_s, "action": action,
            "before": before, "after": after}  # fmt: skip


def render(data: dict[str, Any]) -> list[str]:
    """Markdown: one row per N, the effort and cost before and after the probe."""
    rows = []
    for r in data["results"]:
        before, after = r["before"], r["after"]
        rows.append({
            "n": f"{r['n']:,}", "winner": f"{r['winner']} ({r['knob']})",
            "before": f"{before['effort']}: {before['recall']:.2f}, {before['ms']:.1f} ms",
            "after": f"{after['effort']}: {after['recall']:.2f}, {after['ms']:.1f} ms",
            "default": str(r["default_effort"]), "probe": f"{r['probe_s']:.1f} s",
        })  # fmt: skip
    cols = [("n", "N", None), ("winner", "race winner (knob)", None),
            ("before", "after the race: effort: recall@k, ms per batch", None),
            ("after", "after one probe", None), ("default", "default effort", None),
            ("probe", "probe (exact top-k + re-measures)", None)]  # fmt: skip
    command = data["meta"].get("command")
    return [f"Command: `{command}` (D = {data['results'][0]['d']}, B = {data['meta']['batch']}, "
            f"M = {data['meta']['num']}, target {data['meta']['target']:g}; k is the step's, "
            "recall@k of a batch of features near their classes' rows against exact top-k).",
            "", markdown_table(rows, cols)]  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--num", type=int, default=1000, help="M, active classes per step")
    p.add_argument("--target", type=float, default=0.9, help="target_recall")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--out", default=RESULT, help="result name under docs/bench/")
    args = p.parse_args(argv)
    setup_run(args.threads)
    clock = RunClock()
    results = []
    for n in args.sizes:
        results.append(retune_once(n, args))
        free_memory()
    meta = clock.meta(command="python -m bench.effort_retune " + " ".join(sys.argv[1:]),
                      batch=args.batch, num=args.num, target=args.target)  # fmt: skip
    data = {"results": results, "meta": meta}
    write_json(args.out, data)
    print("\n".join(render(data)))
    return data


if __name__ == "__main__":
    main()
