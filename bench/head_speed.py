"""Time one classifier-head training step: select, gather, forward/backward, update.

Samplers: ``full`` (W an ``nn.Parameter`` over all N classes + ``torch.optim.SGD`` with
momentum, i.e. the real ``SampledClassifier`` with the dense ``full`` sampler, as a user
would train a plain softmax), ``random``, ``annoy``, ``hnsw``, ``exact`` (the real samplers
from ``hf_softmax.samplers`` behind the real ``SampledClassifier`` with its sparse update), and
``dense-update`` (not in the default grid): the random sampler's M rows, but W is one
``nn.Parameter`` whose dense (N, D) gradient and momentum torch SGD updates over all N rows
every step, as Partial FC v2 does.

Grid: N in {1e4, 1e5, 1e6} x D in {128, 256, 512}, B = 256, M = 1000; ``--quick`` keeps
D = 256; ``--large`` adds N = 1e7 at D = 128 with W in host memory (``offload``).
Indexes are built once before timing (build time reported separately). Each step gets a
fresh batch from a small pre-generated pool so data generation is not timed.

    python -m bench.head_speed --quick
    python -m bench.head_speed --n 1000000 --d 256
    python -m bench.head_speed --large --samplers random annoy exact
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

# Before torch loads OpenMP: on a shared machine, spinning OpenMP barriers make every
# multi-threaded op 10-100x slower when other processes hold the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from bench.common import (  # noqa: E402
    PeakMemory,
    RunClock,
    Stopwatch,
    family_rows,
    features_near,
    fmt_bytes,
    fmt_count,
    fmt_ratio,
    fmt_seconds,
    free_memory,
    markdown_table,
    pyplot,
    rss_bytes,
    sampler_config,
    save_figure,
    setup_run,
    sync,
    write_json,
)
from hf_softmax.classifier import SampledClassifier  # noqa: E402
from hf_softmax.dense_classifier import DenseClassifier  # noqa: E402
from hf_softmax.heads import build_head  # noqa: E402
from hf_softmax.output import ClassifierOutput  # noqa: E402
from hf_softmax.samplers import build_sampler  # noqa: E402

log = logging.getLogger("bench.head_speed")

SAMPLERS = ("full", "random", "annoy", "hnsw", "exact")
DENSE_UPDATE = "dense-update"  # random rows, dense N x D optimizer update (Partial FC v2)
VARIANTS = (*SAMPLERS, DENSE_UPDATE)
FULL_GRID = [(n, d) for n in (10_000, 100_000, 1_000_000) for d in (128, 256, 512)]
QUICK_GRID = [(n, 256) for n in (10_000, 100_000, 1_000_000)]
LARGE_POINT = (10_000_000, 128)
LR = 0.1


@dataclass
class StepResult:
    """One (sampler, N, D) point: median step seconds and where the time goes."""

    sampler: str
    num_classes: int
    dim: int
    batch: int
    num: int
    step_s: float
    steps: int
    splits: dict[str, float] = field(default_factory=dict)
    build_s: float | None = None
    state_bytes: int = 0
    index_bytes: int | None = None
    peak_host_bytes: int = 0
    peak_cuda_bytes: int = 0
    offload: bool = False
    knobs: dict[str, Any] = field(default_factory=dict)
    vs_full: float | None = None
    vs_random: float | None = None
    note: str = ""


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def estimated_bytes(sampler: str, n: int, d: int) -> int:
    """Rough peak host bytes of one configuration (W, momentum, grads, index build)."""
    row = n * d * 4
    if sampler in ("full", DENSE_UPDATE):
        return 3 * row  # weight, grad, momentum
    base = 2 * row  # weight + momentum
    if sampler == "annoy":
        # snapshot copy + build_index's Python-list conversion (~32 bytes per float) + index
        return base + row + 8 * row + 2 * row
    if sampler == "hnsw":
        return base + row + row + n * 16 * 8
    if sampler == "exact":
        return base + row  # the index is a copy of W
    return base


def hnsw_quick_knobs(n: int, quick: bool) -> dict[str, Any]:
    """Quick mode builds hnsw at N >= 10^6 lean (m=8, ef_construction=40; ef unchanged): the
    default build (m=16, ef_construction=100) takes minutes there on 2 cores."""
    return {"m": 8, "ef_construction": 40} if quick and n >= 1_000_000 else {}


class DenseUpdateClassifier(nn.Module):
    """Partial FC v2's update on the ``random`` sampler's active set.

    W (N, D) is one ``nn.Parameter``: the M rows are gathered inside autograd, so backward
    writes a dense (N, D) gradient (zeros outside A) and ``torch.optim.SGD`` with momentum and
    weight decay moves all N rows and their momentum every step: O(N * D) per step, the cost
    the lazy sparse update avoids. Same interface as ``SampledClassifier`` for ``HeadBench``.
    """

    def __init__(self, sampler, head: nn.Module, weight: torch.Tensor) -> None:
        super().__init__()
        self.sampler = sampler
        self.head = head
        self.weight = nn.Parameter(weight.detach())

    def place(self, device: torch.device | str) -> None:
        self.to(device)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> ClassifierOutput:
        """features (B, D), labels (B,) -> loss over the M active rows (logits (B, M))."""
        active = self.sampler.select(features.detach(), labels)
        rows = self.weight.index_select(0, active.ids.to(self.weight.device))  # (M, D)
        targets = active.targets.to(features.device, non_blocking=True)
        logits = self.head(features, rows, targets)
        loss = F.cross_entropy(logits, targets)
        return ClassifierOutput(loss, logits, targets, active, accuracy=loss.new_zeros(()))

    def step(self, out: ClassifierOutput, lr: float) -> None:  # the torch optimizer owns W
        pass


class HeadBench:
    """The real classifier for one (sampler, N, D) and its timed training step.

    ``shared``: (W, momentum) storage to install instead of the classifier's own, so the
    sparse samplers of one grid point can live side by side (timed in alternating rounds)
    without one N x D copy each; what the benchmark measures (time) does not depend on the
    values in W. ``weight``: initial W (N, D) used in place (its device and pinning kept),
    e.g. made on the GPU; default: family rows generated on the host.
    """

    def __init__(
        self,
        sampler_name: str,
        n: int,
        d: int,
        batch: int,
        num: int,
        head: str,
        device: str,
        features: str,
        offload: bool,
        knobs: dict[str, Any],
        shared: tuple[torch.Tensor, torch.Tensor] | None = None,
        seed: int = 0,
        pool: int = 8,
        weight: torch.Tensor | None = None,
    ) -> None:
        self.name = sampler_name
        self.device = torch.device(device)
        self.knobs = knobs
        head_module = build_head(head)
        dense_update = sampler_name == DENSE_UPDATE
        cfg = sampler_config("random" if dense_update else sampler_name, num, **knobs)
        sampler = build_sampler(cfg, n, head_module.metric, seed)
        if dense_update:
            if weight is None:
                weight = torch.from_numpy(family_rows(n, d, seed=seed, scale=0.05))
            self.clf = DenseUpdateClassifier(sampler, head_module, weight)
        elif sampler.dense:
            self.clf = DenseClassifier(n, d, head_module, sampler, seed=seed, weight=weight)
            if weight is None:  # W := class vectors in families (in place)
                family_rows(n, d, seed=seed, scale=0.05, out=self.clf.weight.detach().numpy())
        else:
            self.clf = SampledClassifier(
                n, d, head_module, sampler, offload=offload, seed=seed, weight=weight
            )
            if weight is not None:
                pass  # W given: used as is
            elif shared is not None:
                self.clf.store.weight, self.clf.store.momentum_buffer = shared
            else:
                # W := class vectors in families (fills the classifier's own storage in place).
                family_rows(n, d, seed=seed, scale=0.05, out=self.clf.weight.detach().numpy())
        self.clf.place(self.device)
        self.opt = (
            torch.optim.SGD(self.clf.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
            if isinstance(self.clf, (DenseClassifier, DenseUpdateClassifier))
            else None
        )
        rng = np.random.default_rng(seed + 1)
        w_all = self.clf.weight.detach()
        self.batches = []
        for _ in range(pool):
            labels = rng.integers(0, n, batch)
            if features == "clustered":
                # only the labels' rows leave W's device (W may be 10^7 rows on a GPU)
                w = w_all[torch.from_numpy(labels).to(w_all.device)].cpu().numpy()  # (B, D)
                feats = features_near(w, np.arange(batch), noise=0.5, rng=rng)
            else:
                feats = rng.standard_normal((batch, d), dtype=np.float32)
            self.batches.append(
                (torch.from_numpy(feats).to(self.device), torch.from_numpy(labels).to(self.device))
            )
        self._i = 0
        self.per_round = 1
        self.sw = Stopwatch()
        self.times: list[float] = []
        # instrument the real select: its share of the forward is reported separately
        real_select = sampler.select

        def timed_select(f: torch.Tensor, y: torch.Tensor):
            t0 = time.perf_counter()
            out = real_select(f, y)
            self.sw.splits.setdefault("select", []).append(time.perf_counter() - t0)
            return out

        sampler.select = timed_select  # type: ignore[method-assign]

    def shared_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.clf.store.weight, self.clf.store.momentum_buffer

    def build(self) -> float | None:
        sampler = self.clf.sampler
        if not sampler.needs_index:
            return None
        t0 = time.perf_counter()
        # No training runs during this build, so W itself serves as the snapshot (no copy).
        weights = self.clf.weight.detach().cpu().numpy()
        sampler.swap(sampler.build_index(weights))
        return time.perf_counter() - t0

    def step(self, record: bool = True) -> None:
        feats, labels = self.batches[self._i % len(self.batches)]
        self._i += 1
        sw, dev = self.sw, self.device.type
        f = feats.detach().requires_grad_(True)  # stands for the backbone output
        t0 = time.perf_counter()
        out = self.clf(f, labels)
        sync(dev)
        t1 = time.perf_counter()
        out.loss.backward()
        sync(dev)
        t2 = time.perf_counter()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=False)
        else:
            self.clf.step(out, LR)
        sync(dev)
        t3 = time.perf_counter()
        sel = sw.splits["select"].pop() if not record else sw.splits["select"][-1]
        if not record:
            return
        self.times.append(t3 - t0)
        sw.splits.setdefault("gather+forward", []).append(t1 - t0 - sel)
        sw.splits.setdefault("backward", []).append(t2 - t1)
        sw.splits.setdefault("update", []).append(t3 - t2)


def _state_bytes(sampler: str, n: int, d: int) -> int:
    """W + momentum (+ gradient for the dense baseline and dense-update), float32."""
    return (3 if sampler in ("full", DENSE_UPDATE) else 2) * n * d * 4


def bench_point(
    samplers: tuple[str, ...],
    n: int,
    d: int,
    *,
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
    benches: dict[str, HeadBench] = {}
    results: dict[str, StepResult] = {}
    shared = None
    order = [s for s in samplers]
    for s in order:
        knobs = hnsw_quick_knobs(n, quick) if s == "hnsw" else {}
        need = estimated_bytes(s, n, d) - (2 * n * d * 4 if shared is not None else 0)
        avail = _mem_available()
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
            num=n if s == "full" else num,
            step_s=float("nan"),
            steps=0,
            build_s=build_s,
            state_bytes=_state_bytes(s, n, d),
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


def add_ratios(results: list[StepResult]) -> None:
    by_point: dict[tuple[int, int], dict[str, StepResult]] = {}
    for r in results:
        by_point.setdefault((r.num_classes, r.dim), {})[r.sampler] = r
    for group in by_point.values():
        full, rnd = group.get("full"), group.get("random")
        for r in group.values():
            if full is not None and not math.isnan(full.step_s) and r.step_s > 0:
                r.vs_full = full.step_s / r.step_s  # speed-up over full
            if rnd is not None and not math.isnan(rnd.step_s) and rnd.step_s > 0:
                r.vs_random = r.step_s / rnd.step_s  # cost relative to random


def run(
    quick: bool = False,
    large: bool = False,
    device: str = "cpu",
    samplers: tuple[str, ...] = SAMPLERS,
    grid: list[tuple[int, int]] | None = None,
    head: str = "linear",
    features: str = "clustered",
    large_samplers: tuple[str, ...] = ("random", "annoy", "exact"),
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
            batch=256,
            num=1000,
        ),
    }


# --------------------------------------------------------------------------- report


def render(data: dict[str, Any], plot_name: str = "head_speed.png") -> str:
    """Markdown section for docs/benchmarks.md (also writes the plot ``plot_name``)."""
    rows = data["results"]
    meta = data["meta"]
    cols = [
        ("num_classes", "N", fmt_count),
        ("dim", "D", None),
        ("sampler", "sampler", None),
        ("step_s", "step (median)", fmt_seconds),
        ("vs_full", "speed-up vs full", fmt_ratio),
        ("vs_random", "cost vs random", fmt_ratio),
        ("build_s", "index build", fmt_seconds),
        ("state_bytes", "W + momentum (+grad)", fmt_bytes),
        ("index_bytes", "index (resident)", fmt_bytes),
        ("peak_host_bytes", "build/step peak", fmt_bytes),
        ("steps", "steps timed", None),
    ]
    if meta["device"].startswith("cuda"):
        cols.insert(8, ("peak_cuda_bytes", "peak GPU mem", fmt_bytes))
    table_rows = []
    for r in rows:
        r = dict(r)
        if r.get("note"):
            r["sampler"] = f"{r['sampler']} ({r['note']})"
        if r.get("knobs"):
            r["sampler"] = f"{r['sampler']} {r['knobs']}"
        if r.get("offload"):
            r["sampler"] = f"{r['sampler']} [offload]"
        table_rows.append(r)
    split_rows = []
    for r in rows:
        if not r["splits"]:
            continue
        sp = r["splits"]
        split_rows.append(
            {
                "num_classes": r["num_classes"],
                "dim": r["dim"],
                "sampler": r["sampler"],
                "select": sp.get("select"),
                "fwd": sp.get("gather+forward"),
                "bwd": sp.get("backward"),
                "update": sp.get("update"),
            }
        )
    split_cols = [
        ("num_classes", "N", fmt_count),
        ("dim", "D", None),
        ("sampler", "sampler", None),
        ("select", "select", fmt_seconds),
        ("fwd", "gather + forward", fmt_seconds),
        ("bwd", "backward", fmt_seconds),
        ("update", "update", fmt_seconds),
    ]
    plot_path = plot(rows, plot_name)
    lines = [
        f"B = {meta['batch']}, M = {meta['num']}, head `{meta['head']}`, features "
        f"`{meta['features']}`, device `{meta['device']}`, torch threads "
        f"{meta.get('torch_threads')}. Median over the timed steps "
        f"(after 1-2 warm-up steps; samplers timed in alternating rounds). "
        f"*speed-up vs full* = full's step / this step; "
        f"*cost vs random* = this step / random's step, both measured in the same run. "
        f"Memory: *W + momentum (+grad)* = the float32 state arrays (grad only for the dense "
        f"`full`); *index* = resident growth after the build; *build/step peak* = peak RSS "
        f"above the level before the index build and the warm-up steps (build transients, "
        f"lazily allocated gradient/momentum). Load average before/after: "
        f"{_fmt_load(meta.get('loadavg_before'))} / {_fmt_load(meta.get('loadavg_after'))}.",
        "",
        markdown_table(table_rows, cols),
        "",
        "Where the time goes (median seconds per phase; *select* = `sampler.select` "
        "incl. the index query, *gather + forward* = W[A] gather, head and loss):",
        "",
        markdown_table(split_rows, split_cols),
        "",
        f"![head step time vs N]({plot_path.name})",
    ]
    return "\n".join(lines)


def _fmt_load(load: Any) -> str:
    if not load:
        return "n/a"
    return ", ".join(f"{x:.1f}" for x in load)


def plot(rows: list[dict[str, Any]], name: str = "head_speed.png"):
    plt = pyplot()
    dims = sorted({r["dim"] for r in rows})
    fig, axes = plt.subplots(1, len(dims), figsize=(5 * len(dims), 4), squeeze=False)
    for ax, d in zip(axes[0], dims, strict=True):
        for s in VARIANTS:
            pts = sorted(
                (r["num_classes"], r["step_s"])
                for r in rows
                if r["dim"] == d and r["sampler"] == s and not math.isnan(r["step_s"])
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=s)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (classes)")
        ax.set_ylabel("head step (s)")
        ax.set_title(f"D = {d}, B = 256, M = 1000")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    return save_figure(fig, name)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="D = 256 only, few repeats")
    p.add_argument("--large", action="store_true", help="add N = 1e7, D = 128 (offload)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=VARIANTS)
    p.add_argument("--large-samplers", nargs="+", default=["random", "annoy", "exact"])
    p.add_argument("--n", type=int, nargs="+", help="override the grid's N values")
    p.add_argument("--d", type=int, nargs="+", help="override the grid's D values")
    p.add_argument("--head", default="linear", choices=["linear", "cosface", "arcface"])
    p.add_argument("--features", default="clustered", choices=["clustered", "random"])
    p.add_argument("--out", default="head_speed", help="result name under docs/bench/")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
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
    )
    data["meta"]["command"] = "python -m bench.head_speed " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    write_json(args.out, data)
    print(render(data, plot_name=f"{args.out}.png"))
    return data


if __name__ == "__main__":
    main()
