"""The plot of docs/benchmarks.md's "Selection off the critical path" (bench.selection_report)."""

from __future__ import annotations

from typing import Any

from bench.output import pyplot, save_figure
from bench.paths import OUT_DIR

# build_stall runs after a fix, told apart in the plot (run name prefix -> legend suffix)
_FIXES = {
    "stall_hnsw_spare": " (spare graph)",
    "stall_annoy_thread_yield": " (GIL handed over)",
    "stall_annoy_thread_disk": " (GIL handed over, nodes in a file)",
    "stall_annoy_thread_r64": " (every 64 rows, side by side)",
    "stall_annoy_thread_r8": " (every 8 rows, pages released)",
}


def selection_plot(label: dict[str, Any] | None, stall: dict[str, Any] | None) -> str | None:
    """docs/bench/selection.png: step time per selection mode over random's (``label_speed``),
    and the longest step while a build runs over the median (``build_stall``, one colour per
    index, job, mode and fix). Returns its file name, or None without either result."""
    if not label and not stall:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(14, 4))
    for res in (label or {}).get("results", []):
        names = [m for m in res["modes"] if m != "full"]
        axes[0].plot(
            names, [res["modes"][m]["vs_random"] for m in names], "o-", label=f"N = {res['N']:,}"
        )
    axes[0].axhline(1.2, ls="--", c="gray", lw=1)
    axes[0].axhline(2.0, ls=":", c="gray", lw=1)
    axes[0].set(ylabel="step time / random's", title="selection cost (label ≤ 1.2, feature ≤ 2)")
    axes[0].tick_params(axis="x", rotation=20)
    if (label or {}).get("results"):
        axes[0].legend(fontsize=8)
    groups: dict[str, list[dict[str, Any]]] = {}  # one colour and legend entry per kind
    for r in (stall or {}).get("rows", []):
        run = str(r.get("run", ""))
        what = next((v for k, v in _FIXES.items() if run.startswith(k)), "")
        groups.setdefault(f"{r['index']} {r['kind']}, {r['mode']}{what}", []).append(r)
    for tag, rows in groups.items():
        axes[1].scatter([r["N"] for r in rows], [r["max_over_median"] for r in rows], label=tag)
    axes[1].axhline(2.0, ls="--", c="gray", lw=1)
    axes[1].set(xscale="log", yscale="log", xlabel="N", ylabel="longest step / median step")
    axes[1].set_title("steps while a build runs (target ≤ 2)")
    if groups:
        axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    save_figure(fig, "selection", OUT_DIR)
    return "selection.png"
