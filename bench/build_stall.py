"""Build stalls: how long a training step takes while a background index build or refresh runs.

The real ``IndexMaintainer`` rebuilds the index of a real ``SampledClassifier`` while this
thread keeps taking real training steps (select, gather, forward/backward, sparse update),
exactly as ``callbacks.index_rebuild`` drives it. Reported: the longest step seen while the
build ran against the median step without one (target: longest <= 2x median). Modes:
``thread`` (a build thread) and ``process`` (the build worker, ``build_threads`` cores).

    python -m bench.build_stall --n 100000 1000000 --threads 1 --build-threads 1
    python -m bench.build_stall --n 1000000 --indexes annoy --modes process --queries label \
        --table-trees 0 4 --repeat 2 --control --out build_stall_table_trees
    python -m bench.build_stall --indexes annoy --modes process --threads 2 \
        --build-threads 2 0 --repeat 10 --control --out build_stall_threads
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import os
import time
from typing import Any

# Before torch loads OpenMP (see bench.head_speed).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import (  # noqa: E402
    RunClock,
    family_rows,
    features_near,
    free_memory,
    resident_mib,
    sampler_config,
    setup_run,
    steal_seconds,
    write_json,
)
from bench.stall_report import render, summary  # noqa: E402
from callbacks.gc_freeze import freeze_live_objects  # noqa: E402
from hf_softmax.classifier import SampledClassifier  # noqa: E402
from hf_softmax.heads import build_head  # noqa: E402
from hf_softmax.index_build import worker_threads  # noqa: E402
from hf_softmax.index_maintainer import IndexMaintainer  # noqa: E402
from hf_softmax.rebuild_settings import WORKER_MEMORY  # noqa: E402
from hf_softmax.samplers import build_sampler  # noqa: E402

log = logging.getLogger("bench.build_stall")

LR = 0.1
BUILD_KNOB = {"annoy": "n_jobs", "faiss": "threads"}  # an index's build threads (hnsw: 1)
FAR = 10**9  # an interval no step reaches: rebuilds only when this benchmark asks


def stall(
    name: str,
    w: np.ndarray,
    mode: str = "thread",
    build_threads: int | None = None,
    refresh: bool = False,
    prebuilt: Any = None,
    batch: int = 256,
    num: int = 1000,
    baseline_steps: int = 30,
    seed: int = 0,
    gc_freeze: bool = True,
    control: bool = False,
    worker_memory: str = "keep",
    **knobs: Any,
) -> dict[str, Any]:
    """Steps while the maintainer rebuilds ``name``'s index over ``w`` (N, D) in ``mode``.

    refresh: the timed rebuild refreshes the rows the steps before touched (hnsw), else
    builds. prebuilt: an index already built over ``w`` installed instead of the synchronous
    first build (thread mode only: in process mode the worker makes the first build, and
    keeps it for its refreshes). gc_freeze: freeze the objects alive before the timed steps
    out of Python's full GC passes, as ``callbacks.gc_freeze`` does in training. control:
    after the build, as many steps again with no build running: the machine's own longest
    step in that many (``control_max_s``). worker_memory: the build worker's ``keep`` |
    ``release`` (``callbacks.index_rebuild.worker_memory``); its resident memory after the
    timed build goes in ``worker_rss_mib``.
    """
    n, d = w.shape
    head = build_head("linear")
    sampler = build_sampler(sampler_config(name, num, **knobs), n, head.metric, seed)
    clf = SampledClassifier(n, d, head, sampler, seed=seed, weight=torch.from_numpy(w.copy()))
    m = IndexMaintainer(clf, interval=FAR, background=mode, probe_every=0, refresh=refresh,
                        build_threads=build_threads, worker_memory=worker_memory)  # fmt: skip
    rng = np.random.default_rng(seed + 3)
    pool = []
    for _ in range(8):
        labels = rng.integers(0, n, batch)
        feats = features_near(w, labels, noise=0.5, rng=rng)
        pool.append((torch.from_numpy(feats), torch.from_numpy(labels)))

    hooks: list[float] = []  # the maintainer's share of each step (swap, old index dropped)
    cpu: list[float] = []  # each step's CPU time in this thread (wall >> cpu: it waited)
    stolen: list[float] = []  # the hypervisor's steal over each step (all CPUs)

    def step(i: int, at: int) -> float:
        """One training step at global step ``at``, with the maintainer's step-start hook."""
        s0 = steal_seconds()  # read outside the timed span (a /proc read per step)
        t0, c0 = time.perf_counter(), time.thread_time()
        m.on_step_start(at)
        hooks.append(time.perf_counter() - t0)
        f, y = pool[i % len(pool)]
        out = clf(f.detach().requires_grad_(True), y)
        out.loss.backward()
        clf.step(out, LR)
        cpu.append(time.thread_time() - c0)
        wall = time.perf_counter() - t0
        stolen.append(steal_seconds() - s0)
        return wall

    if prebuilt is not None and mode == "thread":
        sampler.swap(prebuilt)
        if refresh:  # as IndexMaintainer.start does: hnsw's spare graph, before any step
            sampler.ready_for_refresh()
        clf.pop_touched()
    else:
        m.start(0)
    if gc_freeze:  # as train.py's callbacks.gc_freeze does at train start
        freeze_live_objects()
    base = [step(i, i + 1) for i in range(3 + baseline_steps)][3:]
    during: list[float] = []
    for kept in (hooks, cpu, stolen):
        kept.clear()
    done_before = m.builds + m.refreshes
    t_start = time.perf_counter()
    i = 0
    while True:  # the first step is a scheduled rebuild (global step 2 * FAR)
        during.append(step(i, 2 * FAR if i == 0 else 2 * FAR + i))
        i += 1
        if m.builds + m.refreshes > done_before and not m.busy:
            break
        if m.failures:
            raise RuntimeError(f"{mode} {name} build failed: {m.records()[-1]}")
        if time.perf_counter() - t_start > 1800:
            raise TimeoutError(f"background {name} build did not finish in 30 min")
    wall = time.perf_counter() - t_start
    after = [step(i + j, 2 * FAR + i + j) for j in range(10)]
    quiet = [step(j, 2 * FAR + i + 10 + j) for j in range(len(during) if control else 0)]
    rec = m.records()[-1]
    process = m.mode() == "process"
    rss = resident_mib(m.worker.pid) if process else None  # freed its index after replying
    m.close()
    gc.unfreeze()
    base_med = float(np.median(base))
    at = int(np.argmax(during))  # 0: the trigger step, steps_during - 1: the swap
    res = {
        "index": name,
        "query": knobs.get("query", "feature")
        + (f", table_trees {knobs['table_trees']}" if knobs.get("table_trees") else ""),
        "mode": mode if m.mode() == mode else f"{mode}: a {m.mode()}",  # hnsw feature
        "build_threads": worker_threads(build_threads) if m.mode() == "process" else build_threads,
        "N": n,
        "kind": rec["kind"],
        "touched": rec["changed"] / n if rec["kind"] == "refresh" else 1.0,
        "build_s": rec["seconds"],
        "wall_s": wall,
        "steps_during": len(during),
        "base_step_s": base_med,
        "median_during_s": float(np.median(during)),
        "max_during_s": float(np.max(during)),
        "longest_at": at,
        "max_hook_s": float(np.max(hooks[: len(during)])),
        "longest_cpu_s": cpu[at],  # ~ longest: computing, not waiting
        "longest_steal_s": stolen[at],  # the VM's vCPUs taken meanwhile
        "steal_during_s": float(np.sum(stolen[: len(during)])),
        # each step less the steal over it (at most its own off-CPU time): the VM's share out
        "max_less_steal_s": max(
            w - min(s, w - c)
            for w, c, s in zip(during, cpu[: len(during)], stolen[: len(during)], strict=True)
        ),  # fmt: skip
        "first_step_s": during[0],
        "swap_step_s": during[-1],
        "median_after_s": float(np.median(after)),
        "stall_s": float(np.max(during)) - base_med,
        "gc_freeze": gc_freeze,
        "worker_memory": worker_memory if process else None,
        "worker_rss_mib": rss,
    }
    res["max_over_median"] = res["max_during_s"] / base_med
    res["less_steal_over_median"] = res["max_less_steal_s"] / base_med
    if quiet:  # the same number of steps, no build: the machine's own outliers
        res["control_max_s"] = float(np.max(quiet))
        res["control_median_s"] = float(np.median(quiet))
        res["control_max_over_median"] = res["control_max_s"] / base_med
    res["met"] = res["max_over_median"] <= 2.0
    log.info("%s", res)
    return res


def run(
    sizes: list[int], dim: int = 256, modes: tuple[str, ...] = ("thread", "process"),
    indexes: tuple[str, ...] = ("annoy", "hnsw"), build_threads: tuple[int | None, ...] = (1,),
    queries: tuple[str, ...] = ("feature",), gc_freeze: bool = True, control: bool = False,
    repeat: int = 1, table_trees: tuple[int, ...] = (0,),
    worker_memory: tuple[str, ...] = ("keep",), extra: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Every build_threads value (None: the worker's default rule) side by side, in turn,
    ``repeat`` times over (each row notes its ``repeat``); label queries once per
    ``table_trees`` value (T > 0: the table alone, no index built)."""
    clock = RunClock()
    rows = []
    for n in sizes:
        w = family_rows(n, dim, scale=0.05)
        for rep in range(repeat):
            for name in indexes:
                for bt in build_threads:
                    own = knobs_for(name, extra or {})
                    knobs = ({BUILD_KNOB[name]: bt or -1} if name in BUILD_KNOB
                             else {"num_threads": 1}) | own  # fmt: skip
                    shown = name + (f" ({', '.join(f'{k} {v}' for k, v in own.items())})"
                                    if own else "")  # fmt: skip
                    settings = [(q, t) for q in queries
                                for t in (table_trees if q == "label" else (0,))]  # fmt: skip
                    for (query, trees), mode, memory in itertools.product(
                        settings, modes, worker_memory
                    ):
                        rows.append({**stall(name, w, mode, bt, refresh=name == "hnsw",
                                             query=query, gc_freeze=gc_freeze, control=control,
                                             worker_memory=memory, **knobs,
                                             **({"table_trees": trees} if trees else {})),
                                     "repeat": rep, "index": shown})  # fmt: skip
                        free_memory()
        del w
        free_memory()
    return {"rows": rows, "meta": clock.meta(dim=dim, build_threads=list(build_threads))}


def knobs_for(name: str, extra: dict[str, Any]) -> dict[str, Any]:
    """The ``--knobs`` that apply to index ``name``: "key" to every index, "name:key" to it."""
    out = {}
    for key, value in extra.items():
        index, sep, own = key.rpartition(":")
        if not sep or index == name:
            out[own] = value
    return out


def knob(text: str) -> tuple[str, Any]:
    """``--knobs`` item "key=value" -> (key, value as YAML reads it: 1 -> int, ivf -> str)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--knobs: expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[100_000])
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--modes", nargs="+", default=["thread", "process"])
    p.add_argument("--indexes", nargs="+", default=["annoy", "hnsw"])
    p.add_argument("--threads", type=int, default=1, help="torch threads of the trainer")
    p.add_argument("--repeat", type=int, default=1, help="runs of each setting, in turn")
    p.add_argument("--build-threads", type=int, nargs="+", default=[1],
                   help="the worker's (and annoy's) build threads, several side by side; 0: "
                        "null, the default rule (the cores torch's threads leave free, at "
                        "least one)")  # fmt: skip
    p.add_argument("--queries", nargs="+", default=["feature"], choices=["feature", "label"],
                   help="label: the build also makes the class table (process: the only "
                        "thing handed back)")  # fmt: skip
    p.add_argument("--table-trees", type=int, nargs="+", default=[0],
                   help="label: 0 the index's table, T > 0 the trees' (no index)")  # fmt: skip
    p.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false",
                   help="no gc freeze (train.py's callbacks.gc_freeze)")  # fmt: skip
    p.add_argument("--control", action="store_true",
                   help="then as many steps with no build (the machine's own)")  # fmt: skip
    p.add_argument("--worker-memory", nargs="+", default=["keep"], choices=WORKER_MEMORY,
                   help="process: the worker's memory between builds, several side by side "
                        "(callbacks.index_rebuild.worker_memory)")  # fmt: skip
    p.add_argument("--knobs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="sampler knobs: key=value for every index, index:key=value for one, "
                        "e.g. faiss:nprobe=1")  # fmt: skip
    p.add_argument("--out", default="build_stall")
    args = p.parse_args(argv)
    setup_run(args.threads)
    threads = tuple(t or None for t in args.build_threads)
    data = run(args.n, args.d, tuple(args.modes), tuple(args.indexes), threads,
               tuple(args.queries), args.gc_freeze, args.control, args.repeat,
               tuple(args.table_trees), tuple(args.worker_memory),
               dict(map(knob, args.knobs)))  # fmt: skip
    write_json(args.out, data)
    print(render(data))
    if args.repeat > 1 or len(threads) > 1 or len(args.worker_memory) > 1:
        print("\n" + summary(data["rows"]))
    return data


if __name__ == "__main__":
    main()
