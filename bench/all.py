"""Run every benchmark and rewrite docs/benchmarks.md (tables, PNG plots, machine, targets).

    python -m bench.all --quick        # < 10 min on 2 cores
    python -m bench.all                # the whole grid (an hour or more on 2 cores)
    python -m bench.all --large        # + N = 1e7 at D = 128 (~10 GB of host memory)
    python -m bench.all --reuse        # re-render the doc from docs/bench/*.json only
    python -m bench.all --reuse --gpu-results gpu_results   # + the GPU check's section

Each section's raw numbers are kept in docs/bench/<name>.json; ``--only`` runs some sections
and re-renders the others from their last JSON (``--reuse`` runs none). ``--gpu-results DIR``
takes the ``summary.json`` that ``bash bench/gpu_check.sh`` wrote there (kept as
docs/bench/gpu_check.json, so later re-renders keep it) into a "GPU" section.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# Before torch loads OpenMP (see bench.head_speed).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench import accuracy, head_speed, index_cost  # noqa: E402
from bench.common import (  # noqa: E402
    DOCS,
    OUT_DIR,
    fmt_count,
    fmt_ratio,
    fmt_seconds,
    machine_info,
    setup_run,
    write_json,
)

log = logging.getLogger("bench.all")

SECTIONS = ("data_throughput", "head_speed", "index_cost", "accuracy")
GPU_JSON = "gpu_check.json"  # docs/bench/: the last GPU check's summary.json


def _load(name: str) -> dict[str, Any] | None:
    path = OUT_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_data_throughput(quick: bool) -> dict[str, Any] | None:
    try:
        from bench import data_throughput
    except ImportError as e:
        log.warning("bench.data_throughput not available (%s); section skipped", e)
        return None
    result = data_throughput.run(quick)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "data_throughput.md").write_text(data_throughput.to_markdown(result))
    (OUT_DIR / "data_throughput.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    data_throughput.plot(result, OUT_DIR / "data_throughput.png")
    return result


# --------------------------------------------------------------------------- targets


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
    sm = accuracy.summary(acc, 0.01)
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
        out.append(
            f"- **Background {b['index']} {b['kind']} (N = {fmt_count(b['N'])})**: {verdict}. "
            f"Longest step while building {fmt_seconds(b['max_during_s'])} vs median step "
            f"{fmt_seconds(b['base_step_s'])}: stall {fmt_seconds(b['stall_s'])} = "
            f"{b['stall_in_steps']:.1f} step times (target ≤ 1"
            + ("" if b["met"] else f", missed by {b['stall_in_steps'] - 1:.1f} step times")
            + "); trigger step (W snapshot + build thread start) "
            f"{fmt_seconds(b['first_step_s'])}, median step "
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


# --------------------------------------------------------------------------- document


def machine_section(info: dict[str, Any], command: str, sections_run: list[str]) -> str:
    v = info["versions"]
    load = ", ".join(f"{x:.1f}" for x in info["loadavg"]) if info["loadavg"] else "n/a"
    return "\n".join(
        [
            "## Machine and command",
            "",
            f"- CPU: {info['cpu']}, {info['cores']} cores (torch threads "
            f"{info['torch_threads']}), RAM {info['ram_gib']} GiB"
            + (f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"),
            f"- torch {v['torch']}, numpy {v['numpy']}, annoy {v['annoy']}, hnswlib "
            f"{v['hnswlib']}, Python {v['python']}",
            f"- date {info['date']}; load average at the start {load} (other processes were "
            "using the cores: every ratio below compares samplers measured side by side in "
            "the same run, absolute times are pessimistic)",
            f"- command: `{command}` (sections run: {', '.join(sections_run) or 'none'}; any "
            "other section is re-rendered from its last JSON in docs/bench/)"
            + (
                f"; total {info['total_seconds'] / 60:.1f} min" if info.get("total_seconds") else ""
            ),
        ]
    )


def write_doc(
    results: dict[str, dict[str, Any] | None],
    info: dict[str, Any],
    command: str,
    sections_run: list[str],
    notes: list[str],
) -> str:
    hs, ic, acc = results.get("head_speed"), results.get("index_cost"), results.get("accuracy")
    parts = [
        "# Benchmarks",
        "",
        "Generated by `bench/all.py` — do not edit by hand; rerun it. Raw numbers: "
        "`docs/bench/*.json`. Tests never time anything; these scripts do.",
        "",
        machine_section(info, command, sections_run),
        "",
        "## Targets (issue 5)",
        "",
        *head_target(hs),
        *accuracy_target(acc),
        *stall_target(ic),
        *large_target(hs),
    ]
    if notes:
        parts += ["", "### Why the misses, and what would close them", "", *notes]
    if hs is not None:
        parts += [
            "",
            "## Head step: time vs number of classes (`bench/head_speed.py`)",
            "",
            head_speed.render(hs),
        ]
    for extra in sorted(OUT_DIR.glob("head_speed_*.json")):
        data = json.loads(extra.read_text())
        name = extra.stem
        parts += [
            "",
            f"### Extra head-step run: `{data['meta'].get('command', name)}`",
            "",
            head_speed.render(data, plot_name=f"{name}.png"),
        ]
        text_links = f"]({name}.png)"
        parts[-1] = parts[-1].replace(text_links, f"](bench/{name}.png)")
    if ic is not None:
        parts += [
            "",
            "## Index cost and recall (`bench/index_cost.py`)",
            "",
            index_cost.render(ic),
        ]
    if acc is not None:
        parts += [
            "",
            "## Accuracy retention on a hard-negative task (`bench/accuracy.py`)",
            "",
            accuracy.render(acc),
        ]
    hangul_md = OUT_DIR / "hangul.md"
    if hangul_md.exists():
        parts += ["", "## Real images: the Hangul benchmark (`python -m bench.hangul run`)", ""]
        parts += [hangul_md.read_text().rstrip()]
    gpu = gpu_section(OUT_DIR / GPU_JSON)
    if gpu:
        parts += ["", gpu]
    dt_md = OUT_DIR / "data_throughput.md"
    if dt_md.exists():
        parts += ["", "## Data pipeline (`bench/data_throughput.py`)", "", dt_md.read_text()]
        if (OUT_DIR / "data_throughput.png").exists():
            parts += ["![data throughput](bench/data_throughput.png)"]
    text = "\n".join(parts).rstrip() + "\n"
    # section renderers link plots relative to docs/bench/; the doc lives in docs/
    for name in ("head_speed", "index_cost", "accuracy_vs_steps", "accuracy_vs_time"):
        text = text.replace(f"]({name}.png)", f"](bench/{name}.png)")
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "benchmarks.md").write_text(text)
    return text


def gpu_section(results: Path) -> str | None:
    """ "GPU" section from a GPU check's ``summary.json`` (``results``: the file or its dir)."""
    from bench.gpu.summary import render_markdown

    path = results / "summary.json" if results.is_dir() else results
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    text = render_markdown(summary, level=2, title="GPU (`bash bench/gpu_check.sh`)")
    return text + f"\n\nRaw numbers: `docs/bench/{GPU_JSON}` (the check's `summary.json`)."


def read_notes() -> list[str]:
    """Hand-written analysis kept beside the generated numbers (docs/bench/notes.md)."""
    path = OUT_DIR / "notes.md"
    return [path.read_text().rstrip()] if path.exists() else []


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the reduced grid (< 10 min, 2 cores)")
    p.add_argument("--large", action="store_true", help="head_speed: add N = 1e7 at D = 128")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    p.add_argument("--reuse", action="store_true", help="run nothing, re-render from JSON")
    p.add_argument("--gpu-results", type=Path, help="a GPU check's output dir (summary.json)")
    args = p.parse_args(argv)
    setup_run(args.threads)
    if args.gpu_results:
        found = args.gpu_results / "summary.json"
        if found.exists():
            OUT_DIR.mkdir(parents=True, exist_ok=True)
            shutil.copy(found, OUT_DIR / GPU_JSON)
            log.info("GPU section from %s", found)
        else:
            log.warning("--gpu-results: no %s; the GPU section is left as it was", found)
    command = "python -m bench.all" + ("".join(" " + shlex.quote(a) for a in sys.argv[1:]))
    to_run = [] if args.reuse else list(args.only or SECTIONS)
    previous = _load("machine")
    if args.reuse and previous is not None:
        # re-render only: keep the machine, command and sections of the run that measured
        write_doc(
            {s: _load(s) for s in SECTIONS},
            previous,
            previous.get("command", command),
            previous.get("sections_run", []),
            read_notes(),
        )
        log.info("re-rendered %s from docs/bench/*.json", DOCS / "benchmarks.md")
        return
    info = machine_info()
    results: dict[str, dict[str, Any] | None] = {s: _load(s) for s in SECTIONS}
    t0 = time.perf_counter()
    for section in to_run:
        ts = time.perf_counter()
        log.info("=== %s ===", section)
        try:
            if section == "data_throughput":
                results[section] = run_data_throughput(args.quick)
            elif section == "head_speed":
                results[section] = head_speed.run(
                    quick=args.quick, large=args.large, device=args.device
                )
            elif section == "index_cost":
                results[section] = index_cost.run(quick=args.quick)
            elif section == "accuracy":
                results[section] = accuracy.run(quick=args.quick)
        except Exception:  # noqa: BLE001 - one failing section must not lose the others
            log.error("section %s failed:\n%s", section, traceback.format_exc())
            continue
        if section != "data_throughput" and results[section] is not None:
            results[section]["meta"]["command"] = command
            write_json(section, results[section])
        log.info("=== %s done in %.0fs ===", section, time.perf_counter() - ts)
    info["total_seconds"] = time.perf_counter() - t0
    info["command"] = command
    info["sections_run"] = to_run
    write_json("machine", info)
    write_doc(results, info, command, to_run, read_notes())
    log.info("wrote %s in %.0fs", DOCS / "benchmarks.md", info["total_seconds"])


if __name__ == "__main__":
    main()
