"""A real index over 10^7 classes in host RAM: size first, then build, query and train step.

For each index (``faiss`` IVF-Flat / IVF-SQ8, ``annoy``) at N x D (default 10^7 x 128):

1. the resident size is estimated before anything is built (faiss: exact formulas; annoy:
   bytes per row measured on a ``--probe-rows`` build, times N) and compared with the memory
   available next to W and its momentum; the build time of annoy is extrapolated the same
   way (x N log N). An index that does not fit, or would build longer than
   ``--max-build-s``, is skipped with the shortfall and the knob that makes it fit;
2. the index is built from W in place (no snapshot copy: nothing trains meanwhile):
   build seconds and RSS growth (the resident size);
3. one query of a batch of B = 256 features at the step's k, and its recall@k against exact
   top-k (``samplers.exact.exact_topk``) on 64 of the features;
4. the median training step of the real ``SampledClassifier`` (``offload``: W and momentum
   in host memory) with that sampler installed, next to ``random``'s on the same W.

    nice python -m bench.index_scale                          # 10^7 x 128, faiss ivf + annoy
    python -m bench.index_scale --n 200000 --indexes faiss-ivf faiss-ivf-sq8 annoy   # quick
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench.head_speed

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import (  # noqa: E402
    RunClock,
    family_rows,
    features_near,
    fmt_bytes,
    free_memory,
    rss_bytes,
    sampler_config,
    setup_run,
    write_json,
)
from bench.head_step import LR  # noqa: E402
from bench.memory import mem_available  # noqa: E402
from hf_softmax.classifier import SampledClassifier  # noqa: E402
from hf_softmax.heads import build_head  # noqa: E402
from hf_softmax.samplers import build_sampler, exact_topk, recall_at_k  # noqa: E402
from hf_softmax.samplers.base import Sampler  # noqa: E402

log = logging.getLogger("bench.index_scale")

INDEXES = ("faiss-ivf", "faiss-ivf-sq8", "annoy")
HEADROOM = 0.85  # use at most this share of MemAvailable


def make_sampler(kind: str, n: int, num: int, args: argparse.Namespace) -> Sampler:
    if kind == "annoy":
        cfg = sampler_config("annoy", num, ntrees=args.ntrees)
    else:
        storage = "sq8" if kind.endswith("sq8") else "flat"
        cfg = sampler_config("faiss", num, index="ivf", nlist=args.nlist, nprobe=args.nprobe,
                             storage=storage, device="cpu")  # fmt: skip
    return build_sampler(cfg, n, "ip", seed=0)


def estimate(kind: str, n: int, d: int, args: argparse.Namespace) -> dict[str, Any]:
    """Resident bytes (and annoy's build seconds) of ``kind`` at N x D, before building it."""
    if kind.startswith("faiss"):
        per_row = (d if kind.endswith("sq8") else 4 * d) + 8  # codes + int64 id
        return {"bytes": n * per_row + args.nlist * d * 4, "how": "faiss layout"}
    rows = min(args.probe_rows, n)
    w = family_rows(rows, d, seed=1, scale=0.05)
    sampler = make_sampler("annoy", rows, min(args.num, rows), args)
    base, t0 = rss_bytes(), time.perf_counter()
    index = sampler.build_index(w)
    seconds, size = time.perf_counter() - t0, max(0, rss_bytes() - base)
    del index, sampler, w
    free_memory()
    scale = n / rows
    return {
        "bytes": int(size * scale),
        "build_s": seconds * scale * math.log(n) / math.log(rows),
        "how": f"annoy measured at {rows} rows ({fmt_bytes(size)}, {seconds:.1f} s), x N",
    }


def time_steps(clf: SampledClassifier, batches: list, steps: int) -> float:
    """Median seconds of a full head step (select, forward, backward, sparse update)."""
    times = []
    for i in range(steps + 1):
        feats, labels = batches[i % len(batches)]
        f = feats.detach().requires_grad_(True)
        t0 = time.perf_counter()
        out = clf(f, labels)
        out.loss.backward()
        clf.step(out, LR)
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_index(kind, clf, batches, args, fixed: int) -> dict[str, Any]:
    n, d = clf.weight.shape
    est = estimate(kind, n, d, args)
    avail = mem_available()
    row: dict[str, Any] = {"index": kind, "estimate_bytes": est["bytes"], "estimate": est["how"],
                           "available_bytes": avail}  # fmt: skip
    if "build_s" in est:
        row["estimate_build_s"] = est["build_s"]
    log.info("%s: estimated %s (%s); %s available", kind, fmt_bytes(est["bytes"]), est["how"],
             fmt_bytes(avail))  # fmt: skip
    short = est["bytes"] - HEADROOM * avail
    if short > 0 or est.get("build_s", 0) > args.max_build_s:
        knob = ("faiss-ivf-sq8 (D bytes per row instead of 4D)" if kind == "faiss-ivf"
                else "fewer trees (sampler.ntrees), or faiss-ivf-sq8")  # fmt: skip
        row["skipped"] = (
            f"needs {fmt_bytes(est['bytes'])}, {fmt_bytes(max(short, 0))} more than "
            f"{HEADROOM:.0%} of the {fmt_bytes(avail)} available"
            if short > 0
            else f"build estimated {est['build_s']:.0f} s > --max-build-s {args.max_build_s:.0f}"
        ) + f"; knob: {knob}"
        log.warning("%s skipped: %s", kind, row["skipped"])
        return row
    sampler = make_sampler(kind, n, args.num, args)
    weights = clf.weight.detach().numpy()  # in place: nothing trains during the build
    free_memory()
    base, t0 = rss_bytes(), time.perf_counter()
    sampler.swap(sampler.build_index(weights))
    row["build_s"] = time.perf_counter() - t0
    row["resident_bytes"] = max(0, rss_bytes() - base)
    log.info("%s: built in %.1f s, resident %s", kind, row["build_s"],
             fmt_bytes(row["resident_bytes"]))  # fmt: skip
    feats = batches[0][0].numpy()
    k = math.ceil((args.num - fixed) / feats.shape[0]) + 1  # the step's k (|P| ~ B)
    sampler.query(feats, k)  # warm-up
    t0 = time.perf_counter()
    found = sampler.query(feats, k)
    row["query_s"], row["k"] = time.perf_counter() - t0, k
    truth = exact_topk(weights, feats[:64], k, "ip")
    row["recall"] = recall_at_k(found[:64], truth)
    if kind == "annoy" and args.search_k:  # what the query effort buys (target_recall's knob)
        row["search_k_sweep"], default = [], sampler.search_k
        for effort in args.search_k:
            sampler.search_k = int(effort)
            t0 = time.perf_counter()
            found = sampler.query(feats, k)
            spent = time.perf_counter() - t0
            row["search_k_sweep"].append({"search_k": int(effort), "query_s": spent,
                                          "recall": recall_at_k(found[:64], truth)})  # fmt: skip
            log.info("annoy search_k %d: query %.1f ms, recall@%d %.3f", effort, 1e3 * spent, k,
                     row["search_k_sweep"][-1]["recall"])  # fmt: skip
        sampler.search_k = default  # the step below runs at the configured effort
    clf.sampler = sampler
    row["step_s"] = time_steps(clf, batches, args.steps)
    log.info("%s: query %.1f ms (k=%d, recall@k %.3f), step %.1f ms", kind, 1e3 * row["query_s"],
             k, row["recall"], 1e3 * row["step_s"])  # fmt: skip
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    clock = RunClock()
    n, d = args.n, args.d
    head = build_head("linear")
    random_sampler = build_sampler(sampler_config("random", args.num), n, head.metric, 0)
    base = rss_bytes()
    clf = SampledClassifier(n, d, head, random_sampler, offload=True, seed=0)
    family_rows(n, d, seed=0, scale=0.05, out=clf.weight.detach().numpy())
    clf.place(torch.device("cpu"))
    state = rss_bytes() - base
    log.info("W + momentum %d x %d: %s resident", n, d, fmt_bytes(state))
    rng = np.random.default_rng(1)
    w = clf.weight.detach().numpy()
    batches = []
    for _ in range(4):
        labels = rng.integers(0, n, args.batch)
        feats = features_near(w[labels], np.arange(args.batch), noise=0.5, rng=rng)
        batches.append((torch.from_numpy(feats), torch.from_numpy(labels)))
    rows = [{"index": "random", "step_s": time_steps(clf, batches, args.steps)}]
    log.info("random: step %.1f ms", 1e3 * rows[0]["step_s"])
    for kind in args.indexes:
        rows.append(bench_index(kind, clf, batches, args, fixed=args.batch))
        clf.sampler = random_sampler  # the index goes with its sampler
        free_memory()
    for r in rows:
        if r.get("step_s") is not None:
            r["vs_random"] = r["step_s"] / rows[0]["step_s"]
    meta = clock.meta(n=n, d=d, batch=args.batch, num=args.num, state_bytes=state,
                      nlist=args.nlist, nprobe=args.nprobe, ntrees=args.ntrees,
                      command="python -m bench.index_scale " + " ".join(sys.argv[1:]))  # fmt: skip
    return {"results": rows, "meta": meta}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--num", type=int, default=1000, help="M, active classes per step")
    p.add_argument("--indexes", nargs="+", default=["faiss-ivf", "annoy"], choices=INDEXES)
    # 4096 ivf cells: the sampler's 4 sqrt(N) default (12649 at 10^7) builds ~3x longer
    p.add_argument("--nlist", type=int, default=4096, help="ivf cells")
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--ntrees", type=int, default=10)
    p.add_argument("--search-k", type=int, nargs="*", default=[],
                   help="annoy: also query at these search_k (query time, recall)")  # fmt: skip
    p.add_argument("--probe-rows", type=int, default=200_000, help="annoy size/time probe")
    p.add_argument("--max-build-s", type=float, default=1200.0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--out", default="index_scale", help="result name under docs/bench/")
    args = p.parse_args(argv)
    setup_run(args.threads)
    data = run(args)
    write_json(args.out, data)
    for r in data["results"]:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    return data


if __name__ == "__main__":
    main()
