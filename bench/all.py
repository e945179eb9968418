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
from bench.benchmarks_doc import GPU_JSON, read_notes, write_doc  # noqa: E402
from bench.common import DOCS, OUT_DIR, machine_info, setup_run, write_json  # noqa: E402
from bench.output import read_json  # noqa: E402

log = logging.getLogger("bench.all")

SECTIONS = ("data_throughput", "head_speed", "index_cost", "accuracy")


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
    previous = read_json("machine")
    if args.reuse and previous is not None:
        # re-render only: keep the machine, command and sections of the run that measured
        write_doc(
            {s: read_json(s) for s in SECTIONS},
            previous,
            previous.get("command", command),
            previous.get("sections_run", []),
            read_notes(),
        )
        log.info("re-rendered %s from docs/bench/*.json", DOCS / "benchmarks.md")
        return
    info = machine_info()
    results: dict[str, dict[str, Any] | None] = {s: read_json(s) for s in SECTIONS}
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
