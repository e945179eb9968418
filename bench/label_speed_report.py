"""docs/benchmarks.md: the tables of ``bench.label_speed`` (the head step by selection mode).

One table per N: each mode's median step, its ratio to random's and the dense softmax's to
it, the index and table builds, and (``--recall-batches``) the recall@k of each per-feature
mode's query against exact top-k; at N = 10^6 the issue's targets are checked below it.
``bench.selection_report`` puts the tables into its section.
"""

from __future__ import annotations

from typing import Any

from bench.formatting import fmt_ms, markdown_table

# the same comparison with W's rows shuffled (as a trained model's) and in family order
ROW_ORDER_RESULTS = ("label_speed_rows_shuffled", "label_speed_rows_family")
ROW_ORDER_CAPTION = (
    "**W's row order** (`--rows`): the benchmarks' rows come in families of near neighbours "
    "at neighbouring ids, so a forest leaf's rows lie in runs of ten in memory; a trained "
    "model's class ids say nothing of where its rows lie (`--rows shuffled`). Two runs back "
    "to back, shuffled first (the features and labels follow the rows):"
)

# faiss ivf's per-feature queries beside annoy's: a run and its repeat (full not timed)
FAISS_RESULTS = ("label_speed_faiss", "label_speed_faiss_repeat")
FAISS_CAPTION = (
    "**Per-feature queries of faiss ivf beside annoy's**, with each query's recall (since "
    "the sampler lowers faiss's BLAS switch, `BLAS_THRESHOLD` in hf_softmax/samplers/faiss.py: "
    "faiss-cpu 1.15.1 searched a batch of 256 against the coarse centroids in its own loop, "
    "10× slower than in BLAS). Two runs, the second on a faster day (random's step 7.7 ms "
    "against 10.2 ms) without the dense baseline:"
)


def _ratio(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def _num(digits: int) -> Any:
    return lambda v: "–" if v is None else f"{v:.{digits}f}"


def _label_command(args: dict[str, Any]) -> str:
    """The command line of a ``bench.label_speed`` run, from the arguments it recorded."""
    words = ["OMP_NUM_THREADS=1 python -m bench.label_speed"]
    words += ["--sizes", *map(str, args.get("sizes", [100_000, 1_000_000]))]
    words += ["--steps", str(args.get("steps", 20))]
    if args.get("exact_max", 0) == 0:
        words += ["--exact-max", "0"]
    words += ["--threads", str(args.get("threads") or 1)]
    words += ["--shares", *(f"{v:g}" for v in args.get("shares", [0.25, 0.5]))]
    if args.get("full_max", 1_000_000) != 1_000_000:
        words += ["--full-max", str(args["full_max"])]
    if args.get("rows", "family") != "family":
        words += ["--rows", args["rows"]]
    if args.get("faiss_nprobes"):
        words += ["--faiss-nprobes", *map(str, args["faiss_nprobes"])]
    if args.get("recall_batches"):
        words += ["--recall-batches", str(args["recall_batches"])]
    if args.get("name", "label_speed") != "label_speed":
        words += ["--name", args["name"]]
    return " ".join(words)


def label_speed_section(data: dict[str, Any]) -> list[str]:
    """Step time per selection mode, one table per N, with the issue's targets checked."""
    lines = [
        f"Command: `{_label_command(data.get('args', {}))}` (D = 256, B = 256, M = 1000, "
        "CPU, one torch thread; the modes take turns step by step, on the same rows and "
        "batches; medians over the timed steps, the first two (full: one) left out as warm-up; "
        "full runs a fifth of the steps; targets at N = 10^6). `build s` is the index "
        "build, `table s` the class table built from it (label mode: every class's `table_k` "
        "= 16 nearest rows); `mixed<s>` is label mode with `feature_share` s."
        + (
            " `feature_faiss_np<p>` queries one faiss ivf index (default `nlist`, float32 rows) "
            "at `nprobe` p."
            if data.get("args", {}).get("faiss_nprobes")
            else ""
        ),
    ]
    cols = [
        ("mode", "mode", None),
        ("median_s", "step ms", fmt_ms),
        ("vs_random", "vs random", _ratio),
        ("speedup_vs_full", "speed-up vs full", lambda v: "–" if v is None else f"{v:.0f}×"),
        ("build_s", "build s", _num(1)),
        ("table_s", "table s", _num(1)),
    ]
    for res in data.get("results", []):
        modes = res["modes"]
        rows = [{"mode": m, **v} for m, v in modes.items()]
        load = res.get("load_start")
        where = f" (load average at start {load[0]:.1f})" if load else ""
        recall = res.get("recall")
        shown = cols + [("recall", f"recall@{'/'.join(map(str, recall['k']))}", _num(3))
                        ] if recall else cols  # fmt: skip
        lines += ["", f"**N = {res['N']:,}**{where}", "", markdown_table(rows, shown)]
        if recall:
            lines += ["", f"`recall@k`: the per-feature query's share of the exact top-k rows "
                      f"(k: what a step asks for), over the first {recall['queries']} "
                      "features of the run."]  # fmt: skip
        if res["N"] == 1_000_000:  # the targets are set at N = 10^6
            lines += ["", *_label_targets(res)]
    return lines


def _label_targets(res: dict[str, Any]) -> list[str]:
    modes = res["modes"]
    out = []
    for mode, entry in modes.items():
        if mode.startswith("label_"):
            bound = 1.2
        elif mode.startswith("feature_"):
            bound = 2.0
        else:
            continue
        ratio, speedup = entry["vs_random"], entry.get("speedup_vs_full")
        met = ratio <= bound and (speedup is None or speedup >= 100)
        full = "" if speedup is None else f", {speedup:.0f}× faster than full (target ≥ 100×)"
        out.append(
            f"- {'met' if met else 'MISSED'}: `{mode}` step {ratio:.2f}× random's "
            f"(target ≤ {bound}×){full}"
        )
    return out
