"""docs/benchmarks.md, "Selection off the critical path": what choosing the active classes costs.

Renders the results of six scripts (each writes its JSON under docs/bench/; this module only
reads them):

- ``python -m bench.label_speed`` -> ``label_speed.json``: the head step with random,
  label-driven (``sampler.query=label``) and per-feature (``query=feature``) selection, and
  the dense baseline, side by side at N = 1e5 / 1e6 (``label_speed_long.json``: 10^6 over
  300 steps; ``label_speed_faiss.json``: with faiss ivf's per-feature queries and each
  query's recall; ``label_speed_rows_{shuffled,family}.json``: W's rows shuffled and in
  family order, ``--rows``);
- ``python -m bench.build_stall`` -> ``build_stall.json``: steps while an index build runs in
  a thread or in the build process (``build_stall_threads.json``: the worker's build threads
  beside torch's, ``--repeat``ed);
- ``python -m bench.index_scale`` -> ``index_scale.json``: an index over 10^7 rows in host RAM
  (``index_scale_annoy.json``: annoy alone on an idle machine, with a ``--search-k`` sweep);
- ``python -m bench.accuracy --query ...`` -> ``accuracy_label.json``: label vs feature
  selection on the synthetic hard-negative task;
- ``python -m bench.auto_race`` -> ``auto_race.json``: ``sampler=auto``'s race of annoy
  against faiss for a target recall;
- ``python -m bench.effort_retune`` -> ``effort_retune.json``: what one ``target_recall``
  probe on trained-like rows does to the effort a race on a fresh run's rows chose.

``python -m bench.selection_report`` re-renders docs/bench/selection.md and its plot
(``bench.selection_plot``);
``python -m bench.all --reuse`` puts it into docs/benchmarks.md.
"""

from __future__ import annotations

from typing import Any

from bench import auto_race, effort_retune
from bench.formatting import fmt_ms, markdown_table
from bench.label_speed_report import (
    FAISS_CAPTION,
    FAISS_RESULTS,
    ROW_ORDER_CAPTION,
    ROW_ORDER_RESULTS,
    label_speed_section,
)
from bench.output import read_json
from bench.paths import OUT_DIR
from bench.selection_plot import selection_plot
from bench.stall_report import summary as stall_summary

GIB = 2**30
# repeated build_stall runs shown as a summary: (result name, what they compare)
STALL_REPEATS = (
    ("build_stall_threads", "The worker's build threads beside torch's"),
    ("build_stall_1e6_repeat", "The target's setting at 10^6, repeated"),
    ("build_stall_table_trees", "Label mode's table alone (`table_trees`) against annoy's"),
    ("build_stall_kept_block", "The table alone, the worker keeping the shared block mapped"),
    ("build_stall_steal", "Feature mode and the table alone, the VM's steal recorded"),
    ("build_stall_worker_memory", "The worker keeping its memory between builds, or not"),
    ("build_stall_worker_memory_label", "The same in label mode, three runs more"),
    ("build_stall_faiss", "Feature mode with faiss ivf (`nprobe` 1) beside annoy"),
    ("build_stall_faiss_in_memory", "The same, faiss's index read into the trainer's memory"),
    ("build_stall_faiss_one_query_thread", "faiss in memory with one query thread"),
)


def _two(v: float) -> str:
    return f"{v:.2f}"


def accuracy_section(feature: dict[str, Any], label: dict[str, Any]) -> list[str]:
    """Final top-1 per (M/N, sampler, query) of two bench.accuracy runs, vs random."""
    cells: dict[float, dict[str, float]] = {}
    for data, query in ((feature, "feature"), (label, "label")):
        for r in data.get("results", []):
            name = "random" if r["sampler"] == "random" else f"{r['sampler']} {query}"
            cells.setdefault(r["fraction"], {})[name] = r["top1"]
    names = ["random"] + sorted({n for c in cells.values() for n in c} - {"random"})
    rows = []
    for fraction in sorted(cells):
        base = cells[fraction].get("random")
        row: dict[str, Any] = {"M/N": f"{100 * fraction:g}%"}
        for n in names:
            v = cells[fraction].get(n)
            delta = (
                "" if v is None or base is None or n == "random" else f" ({100 * (v - base):+.1f})"
            )
            row[n] = "–" if v is None else f"{100 * v:.1f}{delta}"
        rows.append(row)
    meta = label.get("meta", {})
    return [
        "Commands: `python -m bench.accuracy --quick --samplers random auto annoy --fractions "
        "0.01 0.02 --threads 1 --query feature --out accuracy_label_feature`, then `--samplers "
        "auto annoy --query label --out accuracy_label` (the synthetic hard-negative task, "
        f"N = {meta.get('num_classes', '10^4')}, the same steps and data order for every run, "
        "one seed; top-1 %, in brackets points over random; `auto` chose its exact backend).",
        "",
        markdown_table(rows, [(k, k, None) for k in rows[0]]) if rows else "",
    ]


def stall_section(data: dict[str, Any]) -> list[str]:
    cols = [
        ("N", "N", lambda v: f"{v:,}"),
        ("index", "index", None),
        ("query", "selection", None),
        ("kind", "job", None),
        ("mode", "where", None),
        ("build_s", "build s", lambda v: f"{v:.0f}"),
        ("base_step_s", "step ms (no build)", fmt_ms),
        ("median_during_s", "median ms (during)", fmt_ms),
        ("max_during_s", "longest ms", fmt_ms),
        ("longest_cpu_s", "its CPU ms", fmt_ms),
        ("max_over_median", "longest / median", lambda v: f"{v:.1f}"),
        ("control_max_over_median", "no build: longest / median", lambda v: f"{v:.1f}"),
        ("machine", "machine", None),
    ]
    loads = [r.get("loadavg_before", [None])[0] for r in data.get("runs", [])]
    load = ", ".join(f"{v:.1f}" for v in loads if v is not None)
    return [
        f"Command: `{data.get('command', 'python -m bench.build_stall')}` (D = 256, B = 256, "
        "M = 1000, `torch_threads=1`, one build thread; `longest / median` is the longest step "
        "while the build ran over the median step without a build; target ≤ 2). Most runs "
        f"shared the 2 cores with other jobs (load averages {load}): a descheduled step "
        "makes `longest` a measure of the machine as much as of the build; the `quieter` rows "
        "ran beside one training job only.",
        "",
        markdown_table(data.get("rows", []), cols),
    ]


def scale_section(data: dict[str, Any]) -> list[str]:
    meta = data.get("meta", {})
    lines = [
        f"Command: `{meta.get('command', 'python -m bench.index_scale')}` "
        f"(N = {meta.get('n', 0):,}, D = {meta.get('d')}, B = {meta.get('batch')}, "
        f"M = {meta.get('num')}; W and momentum offloaded to host memory: "
        f"{meta.get('state_bytes', 0) / GIB:.2f} GiB).",
        "",
    ]
    rows = []
    for r in data.get("results", []):
        rows.append(
            {
                "index": r["index"],
                "build": "–" if "build_s" not in r else f"{r['build_s']:.0f} s",
                "resident": "–"
                if "resident_bytes" not in r
                else f"{r['resident_bytes'] / GIB:.2f} GiB",
                "query": "–" if "query_s" not in r else f"{1000 * r['query_s']:.0f} ms",
                "recall": "–" if "recall" not in r else f"{r['recall']:.2f} @ k={r.get('k')}",
                "step": "–" if "step_s" not in r else f"{1000 * r['step_s']:.0f} ms",
                "vs_random": "–" if "vs_random" not in r else f"{r['vs_random']:.2f}×",
                "note": r.get("skipped", ""),
            }
        )
    cols = [(k, k.replace("_", " "), None) for k in rows[0]] if rows else []
    lines += [markdown_table(rows, cols)] if rows else []
    for r in data.get("results", []):  # annoy's query effort against its recall
        sweep = [
            {"search_k": "-1 (default)", "query_s": r.get("query_s"), "recall": r.get("recall")}
        ]
        sweep += r.get("search_k_sweep", [])
        if len(sweep) > 1:
            lines += ["", f"{r['index']}: query effort of one batch of {meta.get('batch')} "
                      f"features at k = {r.get('k')} (recall@k against exact top-k on 64):", "",
                      markdown_table(sweep, [("search_k", "search_k", None),
                                             ("query_s", "query ms", fmt_ms),
                                             ("recall", "recall", _two)])]  # fmt: skip
    return lines


def render() -> str | None:
    """The section's markdown (plot links relative to docs/), or None without any results."""
    label, stall = read_json("label_speed"), read_json("build_stall")
    scale, acc = read_json("index_scale"), read_json("accuracy_label")
    if not any((label, stall, scale, acc, read_json(auto_race.RESULTS[0]))):
        return None
    parts: list[str] = []
    notes = OUT_DIR / "selection_notes.md"  # hand-written analysis beside the numbers
    if notes.exists():
        parts += [notes.read_text().rstrip(), ""]
    if label:
        parts += ["### Step time by selection mode (`bench/label_speed.py`)", ""]
        parts += label_speed_section(label) + [""]
    longer = read_json("label_speed_long")  # the same at 10^6 over 300 steps
    if longer:
        parts += label_speed_section(longer) + [""]
    with_faiss = [d for d in map(read_json, FAISS_RESULTS) if d]  # faiss ivf's queries too
    if with_faiss:
        parts += [FAISS_CAPTION, ""]
        for data in with_faiss:
            parts += label_speed_section(data) + [""]
    layouts = [d for d in map(read_json, ROW_ORDER_RESULTS) if d]
    if layouts:
        parts += [ROW_ORDER_CAPTION, ""]
        for data in layouts:
            parts += label_speed_section(data) + [""]
    feature = read_json("accuracy_label_feature")
    if acc and feature:
        parts += ["### Label vs feature selection: accuracy (`bench/accuracy.py`)", ""]
        parts += accuracy_section(feature, acc) + [""]
    if stall:
        parts += ["### Steps during an index build (`bench/build_stall.py`)", ""]
        parts += stall_section(stall) + [""]
    for name, title in STALL_REPEATS:
        runs = read_json(name)
        if runs:
            parts += [f"{title}: `{runs['command']}`. {runs.get('note', '')}", "",
                      stall_summary(runs["rows"]), ""]  # fmt: skip
    if scale:
        parts += ["### 10^7 classes in host RAM (`bench/index_scale.py`)", ""]
        parts += scale_section(scale) + [""]
    annoy_scale = read_json("index_scale_annoy")  # annoy built and swept on an idle machine
    if annoy_scale:
        parts += scale_section(annoy_scale) + [""]
    races = [d for d in map(read_json, auto_race.RESULTS) if d]
    if races:
        parts += ["### `sampler=auto`: annoy against faiss for a target recall "
                  "(`bench/auto_race.py`)", ""] + auto_race.render(races) + [""]  # fmt: skip
    retune = read_json(effort_retune.RESULT)
    if retune:
        title = "### After the race: one probe on trained-like rows (`bench/effort_retune.py`)"
        parts += [title, ""] + effort_retune.render(retune) + [""]
    plot = selection_plot(label, stall)
    if plot:
        parts += [f"![selection cost](bench/{plot})"]
    return "\n".join(parts).rstrip()


def main() -> None:
    text = render()
    out = OUT_DIR / "selection.md"
    out.write_text((text or "No selection benchmarks yet.") + "\n")
    print(out)


if __name__ == "__main__":
    main()
