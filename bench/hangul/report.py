"""Table and plot of ``python -m bench.hangul run`` results (``docs/bench/hangul.{json,md,png}``).

One table per active fraction M/N: each job's closed-set top-1/top-5 on the held-out faces,
verification accuracy on the easy and look-alike pairs, training wall time, the mean logged
``index/recall@k``, and the difference to ``random`` (same fraction and seed) in points. Rows
with several seeds show the mean and the spread (min..max).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import OUT_DIR, markdown_table, pyplot, save_figure

METRICS = ("top1", "top5", "pairs", "lookalike", "train_s", "recall")


# training images of the full 11,172-class build (592,116): says what a budget is in epochs
TRAIN_IMAGES = 592_116
# how the sampled rows moved (the row "rows" of a result; full's W is always a plain parameter)
RULES = {
    "sphere": "sampled rows kept at `classifier.row_norm` (auto), the defaults since 2026-11-27",
    "mixed": "before `classifier.row_norm`: sampled rows free to grow, lazy momentum",
}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{100 * mean:.1f}"
    return (
        f"{100 * mean:.1f} ({100 * min(values):.1f}..{100 * max(values):.1f}, {len(values)} seeds)"
    )


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of one fraction grouped by label -> one dict per label with means (and spreads)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["label"]].append(r)
    base = groups.get("random")
    base_top1 = statistics.fmean(r["top1"] for r in base) if base else None
    base_time = statistics.fmean(r["train_s"] for r in base) if base else None
    out = []
    for label, rs in groups.items():
        s: dict[str, Any] = {"label": label, "num": rs[0]["num"], "seeds": len(rs)}
        for key in METRICS:
            vals = [r[key] for r in rs if r.get(key) is not None]
            s[key] = statistics.fmean(vals) if vals else None
        s["top1_text"] = _spread([r["top1"] for r in rs])
        old_probe = any(r.get("probe") is None for r in rs)  # see run.PROBE
        s["recall_text"] = None if s["recall"] is None else f"{s['recall']:.2f}" + "*" * old_probe
        s["vs_random"] = None if base_top1 is None else 100 * (s["top1"] - base_top1)
        s["time_ratio"] = None if not base_time else s["train_s"] / base_time
        out.append(s)
    return sorted(out, key=lambda s: -s["top1"])


def render(results: dict[str, Any], plot_name: str = "hangul.png", out_dir: Path = OUT_DIR) -> str:
    """Markdown for docs/benchmarks.md; the plot goes to ``out_dir / plot_name``."""
    rows = results.get("rows", [])
    if not rows:
        return "No Hangul runs yet: `python -m bench.hangul run`."
    lines = [
        f"Data: `{results.get('data')}` (N = {rows[0].get('num_classes')} classes). Same step "
        "budget, seed and data order for every run of a table; top-1/top-5 over all N rows on "
        "the held-out faces (`test.rec`), 10-fold verification on `pairs.bin` (easy) and "
        "`pairs_lookalike.bin`. Train time is the whole `train.py` process (runs shared the "
        "2 cores with other jobs: compare times only roughly). Every run's command: "
        "`docs/bench/hangul.json`. Recall is the mean of the logged `index/recall@k`; `*`: "
        "probed against the rows after the step's own update (before 2026-11-27), which "
        "counted the negatives the step had just pushed away as misses; otherwise against "
        "the rows the step selected with.",
    ]
    columns = [
        ("label", "run", None),
        ("num", "M", str),
        ("top1_text", "top-1 %", None),
        ("vs_random", "vs random (pts)", lambda v: f"{v:+.1f}"),
        ("top5", "top-5 %", _pct),
        ("pairs", "verif. easy %", _pct),
        ("lookalike", "verif. look-alike %", _pct),
        ("train_s", "train s", lambda v: f"{v:.0f}"),
        ("time_ratio", "time / random", lambda v: f"{v:.2f}×"),
        ("recall_text", "recall@k (logged)", None),
    ]
    # one table per budget and row rule: runs are comparable only at the same M/N, steps and
    # batch, and with rows that move by the same rule
    by_budget = group_by_budget(rows)
    for budget in _order(by_budget):
        fraction, steps, batch, rule = budget
        full_set = by_budget[budget][0].get("num_classes") == 11172
        epochs = f", {steps * batch / TRAIN_IMAGES:.2f} epoch" if full_set else ""
        head = (f"**M/N = {100 * fraction:g}%** ({steps} steps of {batch} images{epochs}; "
                f"{RULES[rule]})")  # fmt: skip
        lines += ["", head, "", markdown_table(summarise(by_budget[budget]), columns)]
    notes = OUT_DIR / "hangul_notes.md"  # hand-written analysis kept beside the numbers
    if notes.exists():
        lines += ["", notes.read_text().rstrip()]
    _plot(by_budget, plot_name, out_dir)
    lines += ["", f"![Hangul: accuracy vs wall time](bench/{plot_name})"]
    return "\n".join(lines)


def _budget(row: dict[str, Any]) -> tuple[float, int, int, str]:
    rule = "mixed" if row.get("rows", "free") == "free" else "sphere"
    return (float(row["fraction"]), int(row["steps"]), int(row["batch"]), rule)


def group_by_budget(
    rows: list[dict[str, Any]],
) -> dict[tuple[float, int, int, str], list[dict[str, Any]]]:
    """Rows by (M/N, steps, batch, row rule); ``full`` (the dense reference, whose W no rule
    touches) goes into every table of its budget."""
    groups: dict[tuple[float, int, int, str], list[dict[str, Any]]] = defaultdict(list)
    dense = [r for r in rows if r["sampler"] == "full"]
    for r in rows:
        if r["sampler"] != "full":
            groups[_budget(r)].append(r)
    for r in dense:
        key = _budget(r)
        targets = [g for g in groups if g[:3] == key[:3]] or [key]
        for g in targets:
            groups[g].append(r)
    return groups


def _order(groups: dict[tuple[float, int, int, str], Any]) -> list[tuple[float, int, int, str]]:
    """The current row rule first, then the largest M/N, then the longest budget."""
    return sorted(groups, key=lambda b: (b[3] != "sphere", -b[0], -b[1] * b[2]))


def _plot(
    by_budget: dict[tuple[float, int, int, str], list[dict[str, Any]]],
    name: str,
    out_dir: Path = OUT_DIR,
) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = "os^Dv<>p*h"
    for i, budget in enumerate(_order(by_budget)):
        fraction, steps, _, rule = budget
        for j, s in enumerate(summarise(by_budget[budget])):
            for ax, key in zip(axes, ("top1", "lookalike"), strict=True):
                if s.get(key) is None:
                    continue
                era = "" if rule == "sphere" else ", before row_norm"
                label = f"{s['label']} ({100 * fraction:g}%, {steps} steps{era})"
                marker = markers[i % len(markers)]
                color = plt.cm.tab20(j % 20)
                ax.scatter(s["train_s"], 100 * s[key], marker=marker, color=color, label=label)
    axes[0].set(xlabel="train wall time (s)", ylabel="top-1 on held-out faces (%)")
    axes[1].set(xlabel="train wall time (s)", ylabel="look-alike verification (%)")
    axes[1].legend(fontsize=7, loc="best")
    save_figure(fig, name, out_dir)
