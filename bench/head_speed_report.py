"""Markdown table and plot of a head-speed run (``bench.head_speed``) for docs/benchmarks.md."""

from __future__ import annotations

import math
from typing import Any

from bench.common import (
    fmt_bytes,
    fmt_count,
    fmt_ratio,
    fmt_seconds,
    markdown_table,
    pyplot,
    save_figure,
)
from bench.head_step import StepResult


def add_ratios(results: list[StepResult]) -> None:
    """vs_full = full's step / this step; vs_random = this step / random's (same N, D)."""
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
        for s in dict.fromkeys(r["sampler"] for r in rows):  # every variant, in run order
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
