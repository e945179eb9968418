"""Command line of ``python -m bench.hangul run`` (the runner itself is bench.hangul.run).

python -m bench.hangul run                      # full: 11,172 classes, 2000 steps, M/N 2% and 1%
python -m bench.hangul run --quick              # 6,400 classes, 600 steps, M/N 2%: < 15 min
python -m bench.hangul run --samplers random exact --seeds 0 1 2
python -m bench.hangul run --job "exact rf0.5:sampler=exact sampler.random_fraction=0.5"
python -m bench.hangul run --report             # re-render docs from docs/bench/hangul.json
(with ``--results`` elsewhere, the table is printed and the docs are left alone)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import OUT_DIR
from bench.hangul.build import NUM_SYLLABLES, BuildArgs, build
from bench.hangul.report import render
from bench.hangul.run import RESULTS, Job, load_results, run_all

SAMPLERS = ("full", "random", "exact", "annoy", "hnsw", "auto")
QUICK = {
    "classes": 6400,
    "steps": 600,
    "fractions": [0.02],
    "samplers": ["random", "exact", "auto"],
}


def add_run_parser(sub) -> None:
    p = sub.add_parser("run", help="train and score samplers through train.py / evaluate.py")
    p.add_argument("--data", type=Path, help="a built folder (default: build it with --classes)")
    p.add_argument("--classes", type=int, help=f"classes to build (default {NUM_SYLLABLES})")
    p.add_argument("--samplers", nargs="+", choices=SAMPLERS, help="default: all")
    p.add_argument("--fractions", nargs="+", type=float, help="M/N (default 0.02 0.01)")
    p.add_argument("--steps", type=int, help="training steps per job (default 2000)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--threads", type=int, default=2, help="torch_threads of each train.py")
    p.add_argument(
        "--job",
        action="append",
        default=[],
        metavar="LABEL:OVERRIDES",
        help="an extra job: a label, a colon, train.py overrides (sampler=... included)",
    )
    p.add_argument("--no-defaults", action="store_true", help="run only the --job jobs")
    p.add_argument("--quick", action="store_true", help=f"small size: {QUICK}")
    p.add_argument("--work", type=Path, default=Path("outputs/hangul"), help="run folders")
    p.add_argument("--results", type=Path, default=RESULTS, help="results JSON (accumulates)")
    p.add_argument("--force", action="store_true", help="rerun jobs already in the results")
    p.add_argument("--report", action="store_true", help="only re-render the docs")


def parse_job(text: str, fraction: float, seed: int) -> Job:
    """``"label:sampler=exact sampler.random_fraction=0.5"`` -> a Job."""
    label, _, rest = text.partition(":")
    overrides = rest.split()
    sampler = next((o.split("=", 1)[1] for o in overrides if o.startswith("sampler=")), "auto")
    others = [o for o in overrides if not o.startswith("sampler=")]
    return Job(label.strip(), sampler, fraction, seed, others)


def make_jobs(a: argparse.Namespace) -> list[Job]:
    samplers = [] if a.no_defaults else (a.samplers or (QUICK["samplers"] if a.quick else SAMPLERS))
    fractions = a.fractions or (QUICK["fractions"] if a.quick else [0.02, 0.01])
    jobs = []
    for fraction in fractions:
        for seed in a.seeds:
            jobs += [Job(s, s, fraction, seed) for s in samplers]
            jobs += [parse_job(text, fraction, seed) for text in a.job]
    return jobs


def write_report(results_path: Path) -> Path:
    """docs/bench/hangul.md (+ plot), then docs/benchmarks.md re-rendered around it."""
    from bench import all as bench_all

    md = OUT_DIR / "hangul.md"
    md.write_text(render(load_results(results_path)) + "\n")
    bench_all.main(["--reuse"])
    return md


def run_main(a: argparse.Namespace) -> int:
    if not a.report:
        data = a.data
        if data is None:
            classes = a.classes or (QUICK["classes"] if a.quick else NUM_SYLLABLES)
            data = build(BuildArgs(classes=classes))
        steps = a.steps or (QUICK["steps"] if a.quick else 2000)
        run_all(make_jobs(a), Path(data).resolve(), steps, a.batch, a.threads,
                a.work.resolve(), a.force, a.results)  # fmt: skip
    if a.results.resolve() != RESULTS.resolve():  # a side file: the docs show the main one
        out = a.results.resolve().parent
        print(render(load_results(a.results), f"{a.results.stem}.png", out))
        return 0
    print(write_report(a.results))
    return 0
