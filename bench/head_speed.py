"""Time one classifier-head training step: select, gather, forward/backward, update.

Samplers: ``full`` (dense baseline), ``random``, ``annoy``, ``hnsw``, ``exact``, ``faiss``
(real samplers, real ``SampledClassifier``) and ``dense-update`` (random rows with Partial FC
v2's dense optimizer step). The step: ``bench.head_step``; the report: ``head_speed_report``.

Grid: N in {1e4, 1e5, 1e6} x D in {128, 256, 512}, B = 256, M = 1000; ``--quick`` keeps
D = 256; ``--large`` adds N = 1e7 at D = 128 with W in host memory (``offload``).
Indexes are built once before timing (build time reported separately). Each step gets a
fresh batch from a small pre-generated pool so data generation is not timed.

    python -m bench.head_speed --quick
    python -m bench.head_speed --n 1000000 --d 256
    python -m bench.head_speed --large --samplers random annoy exact
    python -m bench.head_speed --n 1000000 --d 256 --samplers random annoy faiss faiss.hnsw \
        --knobs faiss:nprobe=8 faiss.hnsw:index=hnsw     # one kind twice: labelled variants
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import asdict
from typing import Any

# Before torch loads OpenMP: on a shared machine, spinning OpenMP barriers make every
# multi-threaded op 10-100x slower when other processes hold the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import (  # noqa: E402
    PeakMemory,
    RunClock,
    fmt_bytes,
    fmt_seconds,
    free_memory,
    mem_available,
    rss_bytes,
    setup_run,
    write_json,
)
from bench.head_speed_report import add_ratios, render  # noqa: E402
from bench.head_step import (  # noqa: E402
    SAMPLERS,
    HeadBench,
    StepResult,
    check_variant,
    estimated_bytes,
    hnsw_quick_knobs,
    kind_of,
    parse_knobs,
    state_bytes,
)
from hf_softmax.classifier import SampledClassifier  # noqa: E402

log = logging.getLogger("bench.head_speed")

FULL_GRID = [(n, d) for n in (10_000, 100_000, 1_000_000) for d in (128, 256, 512)]
QUICK_GRID = [(n, 256) for n in (10_000, 100_000, 1_000_000)]
LARGE_POINT = (10_000_000, 128)


def bench_point(
    samplers: tuple[str, ...],
    n: int,
    d: int,
    *,
    knobs: dict[str, dict[str, Any]] | None = None,
    batch: int = 256,
    num: int = 1000,
    head: str = "linear",
    device: str = "cpu",
    features: str = "clustered",
    offload: bool = False,
    quick: bool = False,
    rounds: int = 6,
    per_round: int = 10,
    max_seconds: float = 60.0,
    interleave: bool = True,
) -> list[StepResult]:
    """All samplers at one (N, D).

    ``interleave``: every sampler is set up first (sparse ones sharing one W), then timed in
    alternating rounds (each sampler takes ~1 s of steps per round, 1..``per_round``), so
    background load hits all of them alike and the ratios stay fair. Otherwise one sampler
    at a time (own W; used for N = 10^7).
    """
    knobs_of = knobs or {}
    benches: dict[str, HeadBench] = {}
    results: dict[str, StepResult] = {}
    shared = None
    order = [s for s in samplers]
    for s in order:
        lean = hnsw_quick_knobs(n, quick) if kind_of(s) == "hnsw" else {}
        knobs = {**lean, **knobs_of.get(s, {})}
        need = estimated_bytes(s, n, d) - (2 * n * d * 4 if shared is not None else 0)
        avail = mem_available()
        if need > 0.85 * avail:
            note = f"skipped: needs ~{fmt_bytes(need)}, {fmt_bytes(avail)} available"
            log.warning("%s N=%d D=%d %s", s, n, d, note)
            results[s] = StepResult(s, n, d, batch, num, float("nan"), 0, note=note)
            continue
        log.info("%s N=%d D=%d: setting up", s, n, d)
        hb = HeadBench(
            s, n, d, batch, num, head, device, features, offload, knobs,
            shared=shared if interleave else None,
        )  # fmt: skip
        free_memory()
        base = rss_bytes()
        with PeakMemory(device) as pm:
            build_s = hb.build()
            index_bytes = max(0, rss_bytes() - base)
            for _ in range(2 if n < 1_000_000 else 1):  # warm-up: gradients, optimizer state
                t_warm = time.perf_counter()
                hb.step(record=False)
                t_warm = time.perf_counter() - t_warm
        # steps per round: ~1 s of work per sampler per round, at least one step
        hb.per_round = max(1, min(per_round, int(1.0 / max(t_warm, 1e-6))))
        if build_s is not None:
            log.info("%s N=%d D=%d: index built in %.2fs", s, n, d, build_s)
        results[s] = StepResult(
            sampler=s,
            num_classes=n,
            dim=d,
            batch=batch,
            num=n if kind_of(s) == "full" else num,
            step_s=float("nan"),
            steps=0,
            build_s=build_s,
            state_bytes=state_bytes(s, n, d),
            index_bytes=index_bytes if build_s is not None else None,
            peak_host_bytes=pm.host_bytes,
            peak_cuda_bytes=pm.cuda_bytes,
            offload=offload,
            knobs=knobs,
        )
        if interleave:
            if shared is None and isinstance(hb.clf, SampledClassifier):
                shared = hb.shared_state()
            benches[s] = hb
        else:
            _time_rounds({s: hb}, rounds, per_round, max_seconds)
            _finish(results[s], hb)
            del hb
            free_memory()
    if interleave and benches:
        _time_rounds(benches, rounds, per_round, max_seconds)
        for s, hb in benches.items():
            _finish(results[s], hb)
    benches.clear()
    shared = None
    free_memory()
    return [results[s] for s in order]


def _time_rounds(
    benches: dict[str, HeadBench], rounds: int, per_round: int, max_seconds: float
) -> None:
    start = time.perf_counter()
    for r in range(rounds):
        for hb in benches.values():
            for _ in range(hb.per_round):
                hb.step()
        if r >= 1 and time.perf_counter() - start > max_seconds:
            break


def _finish(res: StepResult, hb: HeadBench) -> None:
    res.step_s = float(np.median(hb.times))
    res.steps = len(hb.times)
    res.splits = hb.sw.medians()
    log.info(
        "%s N=%d D=%d: step %s (%d steps) splits %s",
        res.sampler,
        res.num_classes,
        res.dim,
        fmt_seconds(res.step_s),
        res.steps,
        {k: fmt_seconds(v) for k, v in res.splits.items()},
    )


def run(
    quick: bool = False,
    large: bool = False,
    device: str = "cpu",
    samplers: tuple[str, ...] = SAMPLERS,
    grid: list[tuple[int, int]] | None = None,
    head: str = "linear",
    features: str = "clustered",
    large_samplers: tuple[str, ...] = ("random", "annoy", "exact"),
    knobs: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Time every (sampler, N, D) of the grid; returns {"results": [...], "meta": {...}}."""
    if grid is None:
        grid = QUICK_GRID if quick else FULL_GRID
    clock = RunClock()
    results: list[StepResult] = []
    for n, d in grid:
        results += bench_point(
            samplers,
            n,
            d,
            device=device,
            head=head,
            features=features,
            knobs=knobs,
            quick=quick,
            rounds=3 if quick else 8,
            per_round=10,
            max_seconds=25.0 if quick else 120.0,
        )
    if large:
        n, d = LARGE_POINT
        results += bench_point(
            large_samplers,
            n,
            d,
            device=device,
            head=head,
            features=features,
            knobs=knobs,
            offload=True,
            rounds=5,
            per_round=10,
            max_seconds=60.0,
            interleave=False,
        )
    add_ratios(results)
    return {
        "results": [asdict(r) for r in results],
        "meta": clock.meta(
            quick=quick,
            large=large,
            device=device,
            head=head,
            features=features,
            knobs=knobs,
            batch=256,
            num=1000,
        ),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="D = 256 only, few repeats")
    p.add_argument("--large", action="store_true", help="add N = 1e7, D = 128 (offload)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--samplers",
        nargs="+",
        default=list(SAMPLERS),
        type=check_variant,
        help="SAMPLER or SAMPLER.LABEL (e.g. faiss.hnsw, knobs by that name)",
    )
    p.add_argument("--large-samplers", nargs="+", default=["random", "annoy", "exact"])
    p.add_argument("--n", type=int, nargs="+", help="override the grid's N values")
    p.add_argument("--d", type=int, nargs="+", help="override the grid's D values")
    p.add_argument("--head", default="linear", choices=["linear", "cosface", "arcface"])
    p.add_argument("--features", default="clustered", choices=["clustered", "random"])
    p.add_argument("--out", default="head_speed", help="result name under docs/bench/")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--knobs", nargs="+", default=[], metavar="SAMPLER:KEY=VALUE",
                   help="sampler knobs, e.g. faiss:index=hnsw faiss:nprobe=8")  # fmt: skip
    args = p.parse_args(argv)
    setup_run(args.threads)
    grid = None
    if args.n or args.d:
        ns = args.n or [10_000, 100_000, 1_000_000]
        ds = args.d or ([256] if args.quick else [128, 256, 512])
        grid = [(n, d) for n in ns for d in ds]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no GPU available")
    data = run(
        quick=args.quick,
        large=args.large,
        device=args.device,
        samplers=tuple(args.samplers),
        grid=grid,
        head=args.head,
        features=args.features,
        large_samplers=tuple(args.large_samplers),
        knobs=parse_knobs(args.knobs, p),
    )
    data["meta"]["command"] = "python -m bench.head_speed " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    write_json(args.out, data)
    print(render(data, plot_name=f"{args.out}.png"))
    return data


if __name__ == "__main__":
    main()
