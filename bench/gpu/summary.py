"""Part 5 of the GPU check: ``summary.json`` and ``summary.md`` from the parts' files (stdlib only).

``build(out, parts, setup)`` reads ``pytest_cuda.xml``, ``train/train_runs.json`` and
``head/head.json`` under ``out`` (whatever exists: a part that failed or timed out still gets
its row), writes both summaries and returns the JSON. ``render_markdown(summary, level)`` is
also what ``python -m bench.all --gpu-results DIR`` folds into docs/benchmarks.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

SCHEMA = 1


def _sec(s: Any) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "–"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _bytes(b: Any) -> str:
    if b is None:
        return "–"
    return f"{b / 2**20:.0f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def _num(x: Any, fmt: str = "{:,.0f}") -> str:
    return "–" if x is None else fmt.format(x)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def read_pytest(xml: Path) -> dict[str, Any] | None:
    """Counts and per-test outcomes from pytest's junit XML."""
    if not xml.exists():
        return None
    root = ET.parse(xml).getroot()
    tests = []
    for case in root.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                msg = (
                    (node.get("message") or "").splitlines()[0][:200] if node.get("message") else ""
                )
                break
        else:
            msg = ""
        tests.append(
            {
                "name": case.get("name"),
                "outcome": outcome,
                "seconds": float(case.get("time") or 0),
                "message": msg,
            }
        )
    counts = {
        k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")
    }
    return {**counts, "tests": tests}


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def build(
    out: Path,
    parts: dict[str, Any],
    setup: dict[str, Any],
    dry_run: bool,
    total_s: float,
    budget_s: float,
) -> dict[str, Any]:
    """Write ``out/summary.json`` and ``out/summary.md``; returns the summary."""
    device = setup.get("device_name") or ("cpu (dry run)" if dry_run else "no CUDA device")
    summary = {
        "schema": SCHEMA,
        "dry_run": dry_run,
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "host": platform.node(),
        "device": device,
        "total_seconds": round(total_s, 1),
        "budget_seconds": budget_s,
        "parts": parts,
        "setup": {k: v for k, v in setup.items() if k != "nvidia_smi"},
        "pytest": read_pytest(out / "pytest_cuda.xml"),
        "train": _load(out / "train" / "train_runs.json"),
        "head": _load(out / "head" / "head.json"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(render_markdown(summary) + "\n")
    return summary


def render_markdown(s: dict[str, Any], level: int = 1, title: str | None = None) -> str:
    """The summary as Markdown; ``level``: heading level of the title (sections one deeper);
    ``title``: what precedes the device and date (default: GPU check / dry run on CPU)."""
    h, hh = "#" * level, "#" * (level + 1)
    st = s.get("setup") or {}
    kind = "dry run on CPU" if s.get("dry_run") else "GPU check"
    lines = [
        f"{h} {title or kind}: {s['device']}, {s['date']}",
        "",
        f"`bash bench/gpu_check.sh{' --dry-run' if s.get('dry_run') else ''}` on {s['host']}: "
        f"{s['total_seconds']:.0f} s of a {s['budget_seconds']:.0f} s budget. Python "
        f"{st.get('python_version', '?')}, torch {st.get('torch', '?')} (CUDA "
        f"{st.get('torch_cuda') or '–'}), Lightning {st.get('pytorch_lightning', '?')}; "
        f"environment: {st.get('how', '?')}; install: {st.get('install', '?')} "
        f"({st.get('install_seconds', 0):.0f} s).",
        "",
        *_table(
            ["part", "status", "seconds"],
            [
                [k, str(v.get("status")), f"{v.get('seconds', 0):.0f}"]
                for k, v in s["parts"].items()
            ],
        ),
    ]
    pt = s.get("pytest")
    if pt:
        lines += [
            "",
            f"{hh} `pytest -m cuda`",
            "",
            f"{pt['passed']} passed, {pt['failed']} failed, {pt['error']} errors, "
            f"{pt['skipped']} skipped.",
            "",
        ]
        lines += _table(
            ["test", "outcome", "seconds", "message"],
            [[t["name"], t["outcome"], f"{t['seconds']:.1f}", t["message"]] for t in pt["tests"]],
        )
    tr = s.get("train")
    if tr:
        lines += ["", f"{hh} `python train.py` runs", ""]
        d = tr.get("demo") or {}
        if d:
            lines += [
                f"Demo ({d.get('status')}, {d.get('seconds', 0):.0f} s): {d.get('steps', 0)}"
                f" steps, {_num(d.get('samples_per_s'))} samples/s, peak memory "
                f"{_bytes(d.get('peak_device_bytes'))}, {d.get('metric', 'metric')} = "
                f"{_num(d.get('value'), '{:.4f}')}.",
                "",
            ]
        meta, ds = tr.get("meta", {}), tr.get("rec", {}).get("dataset", {})
        params = ds.get("params", {})
        lines += [
            f"Synthetic rec: {_num(params.get('num_classes'))} classes x "
            f"{params.get('images_per_class', '?')} image(s) at {params.get('image_size')} "
            f"px, `model={meta.get('model')}`, B = {meta.get('batch')}, M = "
            f"{meta.get('num')}, up to {meta.get('steps')} steps (median over the steps "
            f"after {meta.get('warmup')} warm-up steps).",
            "",
        ]
        rows = [
            [
                r["sampler"],
                str(r.get("status")),
                str(r.get("steps", 0)),
                _num(r.get("samples_per_s")),
                _sec(r.get("median_step_s")),
                _bytes(r.get("peak_device_bytes")),
                _sec(r.get("first_index_build_s")),
                f"{r.get('seconds', 0):.0f} s",
            ]
            for r in tr.get("rec", {}).get("runs", [])
        ]
        lines += _table(
            [
                "sampler",
                "status",
                "steps",
                "samples/s",
                "step",
                "peak memory",
                "first index build",
                "wall",
            ],
            rows,
        )
    hd = s.get("head")
    if hd:
        m = hd["meta"]
        lines += [
            "",
            f"{hh} Head step (`bench/head_speed.py` on `{m['device']}`)",
            "",
            f"B = {m['batch']}, M = {m['num']}, linear head; median step; device memory "
            "held before the timed steps and `torch.cuda.max_memory_allocated` during "
            "them. `[offload]`: W in pinned host memory.",
            "",
        ]
        rows = [
            [
                f"{r['num_classes']:,}",
                str(r["dim"]),
                r["variant"],
                _sec(r["step_s"]),
                _bytes(r["device_state_bytes"]),
                _bytes(r["peak_device_bytes"]),
                _sec(r["build_s"]),
                str(r["steps"]),
                r["note"],
            ]
            for r in hd["results"]
        ]
        lines += _table(
            [
                "N",
                "D",
                "variant",
                "step",
                "device state",
                "device peak",
                "index build",
                "steps",
                "note",
            ],
            rows,
        )
        cut = [p for p in m.get("points", []) if p.get("status") != "ok"]
        if cut:
            lines += [
                "",
                "Points cut short: "
                + ", ".join(
                    f"N = {p['num_classes']:,}, D = {p['dim']} ({p.get('status')})" for p in cut
                )
                + ".",
            ]
    return "\n".join(lines)
