"""The targets of issue 5 as lines of docs/benchmarks.md: each measured number, the target,
and whether it was met (or by how much it was missed).

- head step at N = 10^6, D = 256: annoy/hnsw >= 100x faster than full, <= 2x random;
- accuracy at M/N = 1%: within 1 point of full, above random;
- background rebuild stall: the longest step during a build <= 1 step time;
- 10^7 classes on one machine (W in host memory).
"""

from __future__ import annotations

import json
import math
from typing import Any

from bench import accuracy_report
from bench.formatting import fmt_count, fmt_ratio, fmt_seconds
from bench.paths import OUT_DIR


def _point(rows: list[dict[str, Any]], n: int, d: int) -> dict[str, dict[str, Any]]:
    return {r["sampler"]: r for r in rows if r["num_classes"] == n and r["dim"] == d}


def head_target(hs: dict[str, Any] | None) -> list[str]:
    """Target 1: N = 1e6, D = 256: annoy/hnsw >= 100x faster than full, <= 2x random.

    Checked on the main head-speed run and on every extra run (docs/bench/head_speed_*.json)
    that has the point, e.g. the full-mode hnsw build next to the quick one.
    """
    runs = [("", hs)] if hs is not None else []
    for extra in sorted(OUT_DIR.glob("head_speed_*.json")):
        data = json.loads(extra.read_text())
        runs.append((f" [`{data['meta'].get('command', extra.stem)}`]", data))
    out = []
    for label, data in runs:
        pt = _point(data["results"], 1_000_000, 256)
        if pt:
            out += _head_lines(pt, label)
    return out or ["- **Head step at N = 10^6, D = 256**: not measured."]


def _head_lines(pt: dict[str, dict[str, Any]], label: str) -> list[str]:
    out = []
    for s in ("annoy", "hnsw"):
        r = pt.get(s)
        if r is None or r["vs_full"] is None:
            continue
        fast = r["vs_full"] >= 100
        cheap = r["vs_random"] is not None and r["vs_random"] <= 2
        verdict = "**met**" if fast and cheap else "**missed**"
        parts = [
            f"{fmt_ratio(r['vs_full'])} faster than full (target ≥ 100×: "
            + ("met" if fast else f"missed by {100 / r['vs_full']:.2f}×")
            + ")",
            f"{fmt_ratio(r['vs_random'])} the cost of random (target ≤ 2×: "
            + ("met" if cheap else f"missed by {r['vs_random'] / 2:.1f}×")
            + ")",
        ]
        sp = r.get("splits", {})
        prof = ", ".join(f"{k} {fmt_seconds(v)}" for k, v in sp.items())
        knobs = f" {r['knobs']}" if r.get("knobs") else ""
        out.append(
            f"- **{s}{knobs} head step, N = 10^6, D = 256**{label}: {verdict}. Step "
            f"{fmt_seconds(r['step_s'])}: " + "; ".join(parts) + f". Profile: {prof}."
        )
    full, rnd = pt.get("full"), pt.get("random")
    if full and rnd:
        out.append(
            f"  Reference in the same run: full {fmt_seconds(full['step_s'])} "
            f"({', '.join(f'{k} {fmt_seconds(v)}' for k, v in full['splits'].items())}); "
            f"random {fmt_seconds(rnd['step_s'])} "
            f"({', '.join(f'{k} {fmt_seconds(v)}' for k, v in rnd['splits'].items())})."
        )
    return out


def accuracy_target(acc: dict[str, Any] | None) -> list[str]:
    if acc is None:
        return ["- **Accuracy at M/N = 1%**: not measured in this run."]
    sm = accuracy_report.summary(acc, 0.01)
    if sm.get("full") is None:
        return ["- **Accuracy at M/N = 1%**: no full-softmax run to compare with."]
    out = []
    for s in ("annoy", "hnsw"):
        if s not in sm:
            continue
        r = sm[s]
        verdict = "**met**" if r["met"] else "**missed**"
        within = r["below_full_points"] <= 1.0
        ahead = r["above_random_points"] is not None and r["above_random_points"] > 0
        out.append(
            f"- **{s} accuracy at M/N = 1%**: {verdict}. Top-1 {100 * r['top1']:.2f}% vs full "
            f"{100 * sm['full']:.2f}% ({-r['below_full_points']:+.2f} points; target ≥ −1: "
            + ("met" if within else f"missed by {r['below_full_points'] - 1:.2f} points")
            + f") and vs random {100 * sm['random']:.2f}% "
            f"({r['above_random_points']:+.2f} points; target > 0: "
            + ("met" if ahead else "missed")
            + ")."
        )
    return out


def stall_target(ic: dict[str, Any] | None) -> list[str]:
    if ic is None or not ic.get("background"):
        return ["- **Background rebuild stall**: not measured in this run."]
    out = []
    for b in ic["background"]:
        verdict = "**met**" if b["met"] else "**missed**"
        where = f" in a {b['mode']}" if b.get("mode") else ""
        if "max_over_median" in b:  # bench.build_stall rows: longest step / median step
            ratio = b["max_over_median"]
            measure = f"{ratio:.1f}× the median step (target ≤ 2"
            miss = "" if b["met"] else f", missed by {ratio / 2:.1f}×"
        else:  # rows of the earlier index_cost runs: stall in step times
            ratio = b["stall_in_steps"]
            measure = f"stall {fmt_seconds(b['stall_s'])} = {ratio:.1f} step times (target ≤ 1"
            miss = "" if b["met"] else f", missed by {ratio - 1:.1f} step times"
        out.append(
            f"- **Background {b['index']} {b['kind']}{where} (N = {fmt_count(b['N'])})**: "
            f"{verdict}. Longest step while building {fmt_seconds(b['max_during_s'])} vs "
            f"median step {fmt_seconds(b['base_step_s'])}: {measure}{miss}); trigger step "
            f"(W snapshot + build start) {fmt_seconds(b['first_step_s'])}, median step "
            f"during the build {fmt_seconds(b['median_during_s'])} "
            f"({b['steps_during']} steps, build {fmt_seconds(b['build_s'])})."
        )
    return out


def large_target(hs: dict[str, Any] | None) -> list[str]:
    rows = [r for r in (hs or {}).get("results", []) if r["num_classes"] >= 10_000_000]
    for extra in sorted(OUT_DIR.glob("head_speed_*.json")):
        data = json.loads(extra.read_text())
        rows += [r for r in data["results"] if r["num_classes"] >= 10_000_000]
    if not rows:
        return [
            "- **10^7 classes on one machine**: not run here (`python -m bench.all --large` "
            "or `python -m bench.head_speed --large`; needs ~10 GB of free host memory)."
        ]
    out = []
    for r in rows:
        if math.isnan(r["step_s"]):
            out.append(f"- **10^7 classes, {r['sampler']}**: {r['note']}.")
            continue
        build = f", index build {fmt_seconds(r['build_s'])}" if r.get("build_s") else ""
        out.append(
            f"- **10^7 classes, D = {r['dim']}, {r['sampler']} (W in host memory)**: "
            f"runs; step {fmt_seconds(r['step_s'])}{build}; W + momentum "
            f"{r['state_bytes'] / 2**30:.1f} GiB, build/step peak "
            f"{r['peak_host_bytes'] / 2**30:.2f} GiB above that."
        )
    return out
