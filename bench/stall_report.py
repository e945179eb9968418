"""Rendering ``bench.build_stall``'s rows: one table of every run (``render``) and one line
per setting over repeated runs (``summary``: medians and ranges)."""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.common import fmt_bytes, fmt_count, fmt_seconds, markdown_table


def _two_or_dash(x: float) -> str:
    return "–" if x != x else f"{x:.2f}"  # NaN: not measured in these runs


def summary(rows: list[dict[str, Any]]) -> str:
    """One line per N, index, mode and build threads over repeated runs: medians and ranges."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        mode = r["mode"] + (f", memory: {r['worker_memory']}" if r.get("worker_memory") else "")
        key = (r["N"], r["index"], r.get("query", "feature"), mode, r["build_threads"])
        groups.setdefault(key, []).append(r)
    out = []
    for (n, index, query, mode, threads), rs in groups.items():
        ratio = [r["max_over_median"] for r in rs]
        rss = [r["worker_rss_mib"] for r in rs if r.get("worker_rss_mib") is not None]
        out.append({
            "N": n, "index": index, "query": query, "mode": mode, "threads": threads,
            "rss": float(np.median(rss)) * 2**20 if rss else None,
            "runs": len(rs),
            "ratio": f"{np.median(ratio):.2f} ({min(ratio):.2f}–{max(ratio):.2f})",
            "build_s": float(np.median([r["build_s"] for r in rs])),
            "during": float(np.median([r["median_during_s"] for r in rs])),
            "control": float(np.median([r.get("control_max_over_median", np.nan) for r in rs])),
            "less_steal": float(np.median([r.get("less_steal_over_median", np.nan) for r in rs])),
        })  # fmt: skip
    return markdown_table(out, [
        ("N", "N", fmt_count), ("index", "index", None), ("query", "selection", None),
        ("mode", "build in", None), ("threads", "build threads", None), ("runs", "runs", None),
        ("ratio", "longest / median: median (range)", None),
        ("build_s", "build time", fmt_seconds), ("during", "median step (during)", fmt_seconds),
        ("control", "no build: longest / median", _two_or_dash),
        ("less_steal", "during, less the VM's steal", _two_or_dash),
    ] + ([("rss", "worker resident after", fmt_bytes)]
         if any(o["rss"] is not None for o in out) else []))  # fmt: skip


COLUMNS = [
    ("N", "N", fmt_count),
    ("index", "index", None),
    ("query", "selection", None),
    ("mode", "build in", None),
    ("kind", "rebuild", None),
    ("build_s", "build time", fmt_seconds),
    ("steps_during", "steps during build", None),
    ("base_step_s", "median step (no build)", fmt_seconds),
    ("median_during_s", "median step (during)", fmt_seconds),
    ("first_step_s", "trigger step", fmt_seconds),
    ("max_during_s", "longest step (during)", fmt_seconds),
    ("max_over_median", "longest / median", lambda x: f"{x:.1f}"),
]


def render(data: dict[str, Any]) -> str:
    meta = data["meta"]
    return "\n".join([
        f"B = 256, M = 1000, D = {meta['dim']}, torch threads {meta['torch_threads']}, build "
        f"threads {meta.get('build_threads')}; the real `IndexMaintainer` rebuilds while the "
        "main thread keeps taking real steps (target: longest step <= 2x the median step).",
        "",
        markdown_table(data["rows"], COLUMNS),
    ])  # fmt: skip
