"""``sampler=auto``'s race (``hf_softmax/samplers/race.py``): annoy against faiss IVF, per N.

For each N (D = 256; rows in families of near neighbours, ``bench.synthetic.family_rows``)
the real ``AutoSampler`` is built from ``conf/sampler/auto.yaml`` and ``prepare`` runs its
race exactly as the first build of a training run with ``target_recall`` does: each
candidate is built, then its query effort doubles until recall@10 of 256 rows' nearest
other rows (against exact top-k) reaches ``--target``. Every effort tried is kept, so the
curves also say which index a lower target would pick. The log line the run would print
(which backend, and why) is kept too.

    python -m bench.auto_race                       # N = 1e5 and 1e6, target 0.95
    python -m bench.auto_race --sizes 20000 --target 0.9 --out auto_race_quick
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench.head_speed

from bench.common import RunClock, family_rows, free_memory, sampler_config, setup_run  # noqa: E402
from bench.formatting import markdown_table  # noqa: E402
from bench.output import pyplot, save_figure, write_json  # noqa: E402
from bench.paths import OUT_DIR  # noqa: E402
from hf_softmax.row_store import initial_rows  # noqa: E402
from hf_softmax.samplers import build_sampler  # noqa: E402

log = logging.getLogger("bench.auto_race")


def race_once(n: int, d: int, target: float, args: argparse.Namespace) -> dict[str, Any]:
    """The race of a fresh ``auto`` over N x D family rows -> its entries and choice."""
    if args.rows == "init":  # what a fresh run races on: the classifier's initial rows
        rows = initial_rows(0, n, n, d, std=0.01, seed=0).numpy()
    else:  # rows with trained-like structure (families of near neighbours)
        rows = family_rows(n, d, seed=0, scale=0.05)
    faiss = {"nlist": args.nlist} if args.nlist else {}
    cfg = sampler_config("auto", args.num, candidates=["annoy", "faiss"], faiss=faiss,
                         exact_max_elements=0,
                         race_queries=args.queries)  # fmt: skip
    sampler = build_sampler(cfg, n, "ip", seed=0)
    t0 = time.perf_counter()
    sampler.prepare(rows.shape, lambda: rows, target)
    seconds = time.perf_counter() - t0
    entries = [
        {"name": e.name, "build_s": e.build_s, "effort": e.effort, "recall": e.recall,
         "query_ms": e.query_ms, "knob": sampler.candidate(e.name).effort_knob,
         "tried": [{"effort": a, "recall": r, "query_ms": ms} for a, r, ms in e.tried]}
        for e in sampler.race_entries
    ]  # fmt: skip
    log.info("N = %d: %s chosen in %.1fs", n, sampler.kind, seconds)
    return {"n": n, "d": d, "rows": args.rows, "target": target, "winner": sampler.kind,
            "race_s": seconds,
            "entries": entries}  # fmt: skip


def first_reaching(entry: dict[str, Any], target: float) -> dict[str, Any] | None:
    """The first effort of ``entry``'s curve with recall >= target (None: never)."""
    return next((t for t in entry["tried"] if t["recall"] >= target), None)


RESULTS = ("auto_race", "auto_race_init", "auto_race_1e7")  # docs/bench/<name>.json


def render(runs: list[dict[str, Any]], targets: tuple[float, ...] = (0.8, 0.9, 0.95)) -> list[str]:
    """Markdown for the race runs ``runs`` (``main``'s JSONs): per N and rows, each
    candidate's build and query cost at each target, the race's choice, and a plot."""
    lines = ["Commands: " + "; ".join(f"`{r['meta'].get('command')}`" for r in runs)
             + ". Recall@10 of 256 rows' nearest other rows against exact top-k; ms per "
             "query row (all cores) at the first effort reaching each target; a race stops at "
             "its own target (–: not tried, or not reached by the effort cap). `family` "
             "rows have trained-like structure, `init` rows are a fresh run's N(0, 0.01).",
             ""]  # fmt: skip
    rows = []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in (r for data in runs for r in data["results"]):
        where = f"{r['n']:,} × {r['d']}, {r.get('rows', 'family')}"
        for e in r["entries"]:
            first = e["tried"][0]
            row = {"rows": where, "index": e["name"], "build": f"{e['build_s']:.1f} s",
                   "default": f"{first['recall']:.2f} @ {first['query_ms']:.3f} ms"}  # fmt: skip
            for t in targets:
                hit = first_reaching(e, t)
                row[f"{t:g}"] = "–" if hit is None else (
                    f"{hit['query_ms']:.3f} ms ({e['knob']} {hit['effort']})")  # fmt: skip
            rows.append(row)
            ax.plot([t["query_ms"] for t in e["tried"]], [t["recall"] for t in e["tried"]],
                    "o-", label=f"{e['name']}, {where}")  # fmt: skip
        rows.append({"rows": "", "index": f"**{r['winner']}** (race for {r['target']:g})"})
    cols = [("rows", "N × D, rows", None), ("index", "index", None), ("build", "build", None),
            ("default", "recall @ cost, default effort", None)]  # fmt: skip
    cols += [(f"{t:g}", f"recall ≥ {t:g}", None) for t in targets]
    ax.set(xscale="log", xlabel="ms per query row", ylabel="recall@10",
           title="auto's race: query effort against recall")  # fmt: skip
    ax.legend(fontsize=7)
    save_figure(fig, "auto_race", OUT_DIR)
    return lines + [markdown_table(rows, cols), "", "![auto race](bench/auto_race.png)"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--num", type=int, default=1000, help="M, active classes per step")
    p.add_argument("--target", type=float, default=0.95, help="recall@10 the race aims at")
    p.add_argument(
        "--rows",
        choices=("family", "init"),
        default="family",
        help="family: trained-like structure; init: a fresh run's N(0, 0.01) rows",
    )
    p.add_argument("--queries", type=int, default=256, help="rows the race queries")
    p.add_argument("--nlist", type=int, default=0, help="faiss ivf cells (0: its default)")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--out", default="auto_race", help="result name under docs/bench/")
    args = p.parse_args(argv)
    setup_run(args.threads)
    clock = RunClock()
    results = []
    for n in args.sizes:
        results.append(race_once(n, args.d, args.target, args))
        free_memory()
    meta = clock.meta(command="python -m bench.auto_race " + " ".join(sys.argv[1:]),
                      queries=args.queries, num=args.num)  # fmt: skip
    data = {"results": results, "meta": meta}
    write_json(args.out, data)
    for r in results:
        for e in r["entries"]:
            print(r["n"], e["name"], f"{e['knob']}={e['effort']}", f"recall {e['recall']:.3f}",
                  f"{e['query_ms']:.3f} ms/query", f"build {e['build_s']:.1f}s")  # fmt: skip
        print(r["n"], "winner:", r["winner"])
    return data


if __name__ == "__main__":
    main()
