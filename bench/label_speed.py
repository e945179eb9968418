"""Head step time of label-driven selection against random, per-feature and full.

One step = select + forward/backward of the head + sparse update (``SampledClassifier``):
features (B, D) near their classes' rows, labels uniform. Modes: ``random``; ``feature``
(the paper's per-feature query, annoy; exact too where N x D is small); ``label`` (the
class-neighbour table, a lookup); ``mixed<s>`` (label mode with ``feature_share`` s: the
first s of the batch also query per feature); ``full`` (dense logits over all N, SGD on
W). The index and table builds are timed separately (``build_s``, ``table_s``); the
sampled modes take turns step by step, so a swing in a shared machine's load hits them
alike. ``table_paths`` times the table's query over the first ``--table-rows`` rows by
vector (the old way) and by the sampler's ``query_rows`` (annoy: by item id over the build
threads). ``--rows shuffled`` shuffles W's rows first (the synthetic rows come in families of
near neighbours at neighbouring ids, which a trained model's class ids are not; the features
and labels follow the rows).

    nice python -m bench.label_speed --sizes 100000 1000000 --steps 20

Writes docs/bench/label_speed.json (medians, ratios to random and full).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import time
from typing import Any

# Before torch loads OpenMP (see bench.head_speed): idle OpenMP threads must not spin on a
# shared machine, or every mode's step measures the spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import (  # noqa: E402
    family_rows,
    features_near,
    loadavg,
    machine_info,
    sampler_config,
    setup_run,
    write_json,
)
from hf_softmax.class_table import TABLE_BATCH
from hf_softmax.classifier import SampledClassifier
from hf_softmax.heads import LinearHead
from hf_softmax.samplers import build_sampler
from hf_softmax.samplers.exact import exact_topk, recall_at_k

log = logging.getLogger("bench.label_speed")


def batches(rows: np.ndarray, b: int, steps: int, seed: int = 0) -> list[tuple[Any, Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        labels = rng.integers(rows.shape[0], size=b)
        feats = features_near(rows, labels, 1.0, rng)
        out.append((torch.from_numpy(feats), torch.from_numpy(labels)))
    return out


def sampled_steps(rows: np.ndarray, samplers: dict[str, Any], data: list) -> dict[str, list]:
    """Step times of each sampler's ``SampledClassifier`` (own copy of the rows), the modes
    taking turns step by step so that a swing in the machine's load hits them alike."""
    clfs = {mode: SampledClassifier(rows.shape[0], rows.shape[1], LinearHead(), sampler,
                                    weight=torch.from_numpy(rows.copy()), prefetch=False)
            for mode, sampler in samplers.items()}  # fmt: skip
    times: dict[str, list[float]] = {mode: [] for mode in clfs}
    for feats, labels in data:
        for mode, clf in clfs.items():
            t0 = time.perf_counter()
            f = feats.clone().requires_grad_(True)
            out = clf(f, labels)
            out.loss.backward()
            clf.step(out, 0.1)
            times[mode].append(time.perf_counter() - t0)
    return {mode: t[2:] for mode, t in times.items()}  # warm-up


def query_recall(rows: np.ndarray, samplers: dict[str, Any], data: list, m: int) -> dict:
    """Recall@k of each per-feature mode's query over ``data``'s features against exact top-k
    (k: what a step asks for, ``Sampler._neighbours``: the B features share the M - positives
    slots, one more each)."""
    weights = torch.from_numpy(rows)
    found: dict[str, list] = {mode: [] for mode in samplers if mode.startswith("feature_")}
    truth, ks = [], set()
    for feats, labels in data:
        b = feats.shape[0]
        k = math.ceil((m - int(labels.unique().numel())) / b) + 1
        ks.add(k)
        truth.append(exact_topk(weights, feats, k))
        for mode in found:
            found[mode].append(samplers[mode].query(feats.numpy(), k))
    return {"k": sorted(ks), "queries": sum(len(t) for t in truth),
            "modes": {mode: recall_at_k(np.concatenate(f), np.concatenate(truth))
                      for mode, f in found.items()}}  # fmt: skip


def full_steps(rows: np.ndarray, data: list) -> list[float]:
    w = torch.nn.Parameter(torch.from_numpy(rows.copy()))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    times = []
    for feats, labels in data:
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(feats @ w.T, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times[1:]


def built(name: str, rows: np.ndarray, m: int, query: str, **knobs: Any) -> tuple[Any, dict]:
    cfg = sampler_config(name, m, query=query, random_fraction=0.0, **knobs)
    sampler = build_sampler(cfg, rows.shape[0], "ip")
    t0 = time.perf_counter()
    index = sampler.build_index(rows)
    t1 = time.perf_counter()
    table = sampler.build_table(index, rows)
    t2 = time.perf_counter()
    sampler.swap(index, table)
    return sampler, {"build_s": t1 - t0, "table_s": (t2 - t1) if table is not None else None}


def table_paths(sampler: Any, index: Any, rows: np.ndarray, q: int) -> dict[str, Any]:
    """The table's query over the first ``q`` rows two ways: by vector (the reference: each
    row's vector through ``query_index``) and the build's own path (``query_rows``)."""
    ids, k = np.arange(min(q, rows.shape[0])), sampler.table_k + 1
    t0 = time.perf_counter()
    ref = [sampler.query_index(index, rows[ids[s : s + TABLE_BATCH]], k)
           for s in range(0, len(ids), TABLE_BATCH)]  # fmt: skip
    t1 = time.perf_counter()
    new = [sampler.query_rows(index, rows, ids[s : s + TABLE_BATCH], k)
           for s in range(0, len(ids), TABLE_BATCH)]  # fmt: skip
    t2 = time.perf_counter()
    same = float((np.concatenate(ref) == np.concatenate(new)).mean())
    return {"rows": len(ids), "by_vector_s": t1 - t0, "query_rows_s": t2 - t1,
            "speedup": (t1 - t0) / (t2 - t1), "same_ids": same}  # fmt: skip


def run_size(
    n: int,
    d: int,
    b: int,
    m: int,
    steps: int,
    full_max: int,
    exact_max: int,
    table_rows: int,
    shares: list[float],
    row_order: str = "family",
    faiss_nprobes: tuple[int, ...] = (),
    recall_batches: int = 0,
) -> dict:
    rows = family_rows(n, d)
    if row_order == "shuffled":  # a model's class ids say nothing of where its rows lie
        rows = rows[np.random.default_rng(7).permutation(n)]
    data = batches(rows, b, steps)
    res: dict[str, Any] = {"N": n, "D": d, "B": b, "M": m, "modes": {}, "load_start": loadavg(),
                           "row_order": row_order}  # fmt: skip

    def record(mode: str, times: list[float], **extra: Any) -> None:
        res["modes"][mode] = {"median_s": statistics.median(times), "steps": len(times), **extra}
        log.info("N=%d %s: %.4fs/step %s", n, mode, statistics.median(times), extra)

    samplers: dict[str, Any] = {"random": build_sampler(sampler_config("random", m), n, "ip")}
    costs: dict[str, dict] = {"random": {}}
    kinds = ["annoy"] + (["exact"] if n * d <= exact_max else [])
    for kind in kinds:
        knobs = {"ntrees": 10, "n_jobs": 2} if kind == "annoy" else {}
        sampler, cost = built(kind, rows, m, "label", **knobs)
        if kind == "annoy":
            res["table_paths"] = table_paths(sampler, sampler.index, rows, table_rows)
            log.info("N=%d table query paths: %s", n, res["table_paths"])
        feature = build_sampler(sampler_config(kind, m, random_fraction=0.0, **knobs), n, "ip")
        feature.swap(sampler.index)  # the same index, queried per feature
        samplers[f"label_{kind}"], samplers[f"feature_{kind}"] = sampler, feature
        costs[f"label_{kind}"], costs[f"feature_{kind}"] = cost, {"build_s": cost["build_s"]}
        for share in shares:  # label mode with a share of per-feature queries
            cfg = sampler_config(kind, m, query="label", random_fraction=0.0,
                                 feature_share=share, **knobs)  # fmt: skip
            mixed = build_sampler(cfg, n, "ip")
            mixed.swap(sampler.index, sampler.table)  # the same index and table
            samplers[f"mixed{share:g}_{kind}"], costs[f"mixed{share:g}_{kind}"] = mixed, cost
    if faiss_nprobes:  # per-feature queries of one faiss ivf index at each nprobe
        for i, nprobe in enumerate(faiss_nprobes):
            cfg = sampler_config("faiss", m, random_fraction=0.0, index="ivf", nprobe=nprobe,
                                 threads=2)  # fmt: skip
            faiss_sampler = build_sampler(cfg, n, "ip")
            if i == 0:
                t0 = time.perf_counter()
                faiss_index = faiss_sampler.build_index(rows)
                costs_faiss = {"build_s": time.perf_counter() - t0}
            faiss_sampler.swap(faiss_index)
            samplers[f"feature_faiss_np{nprobe}"] = faiss_sampler
            costs[f"feature_faiss_np{nprobe}"] = costs_faiss
    if recall_batches:
        res["recall"] = query_recall(rows, samplers, data[:recall_batches], m)
        for mode, recall in res["recall"]["modes"].items():
            costs[mode] = {**costs[mode], "recall": recall}
    for mode, times in sampled_steps(rows, samplers, data).items():
        record(mode, times, **costs[mode])
    del samplers
    if n <= full_max:
        record("full", full_steps(rows, data[: max(3, steps // 5)]))
    res["load_end"] = loadavg()
    base = res["modes"]["random"]["median_s"]
    full = res["modes"].get("full", {}).get("median_s")
    for entry in res["modes"].values():
        entry["vs_random"] = entry["median_s"] / base
        entry["speedup_vs_full"] = None if full is None else full / entry["median_s"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--full-max", type=int, default=1_000_000, help="largest N timed dense")
    ap.add_argument("--exact-max", type=int, default=30_000_000, help="largest N x D for exact")
    ap.add_argument("--table-rows", type=int, default=20_000, help="rows timed both table ways")
    ap.add_argument("--shares", type=float, nargs="*", default=[0.25, 0.5],
                    help="label mode with these feature_share values too")  # fmt: skip
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rows", default="family", choices=["family", "shuffled"],
                    help="W's rows in family order (near rows at near ids) or shuffled, as a "
                    "trained model's are")  # fmt: skip
    ap.add_argument("--faiss-nprobes", type=int, nargs="*", default=[],
                    help="per-feature rows of one faiss ivf index at these nprobe")  # fmt: skip
    ap.add_argument("--recall-batches", type=int, default=0,
                    help="score each per-feature mode's query on this many batches against "
                    "exact top-k (recall@k, the k a step asks for)")  # fmt: skip
    ap.add_argument("--name", default="label_speed")
    args = ap.parse_args()
    setup_run(args.threads)
    results = [run_size(n, args.dim, args.batch, args.num, args.steps, args.full_max,
                        args.exact_max, args.table_rows, args.shares, args.rows,
                        tuple(args.faiss_nprobes), args.recall_batches)
               for n in args.sizes]  # fmt: skip
    path = write_json(args.name, {"machine": machine_info(), "args": vars(args),
                                  "results": results})  # fmt: skip
    log.info("wrote %s", path)


if __name__ == "__main__":
    main()
