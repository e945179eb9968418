"""Part 3 of the GPU check: real ``python train.py trainer=gpu`` runs, time-bounded.

1. the demo (``python train.py trainer=gpu``, 1 epoch): accuracy, samples/s, peak memory;
2. a synthetic 10^5-class InsightFace ``.rec`` (``bench.gpu.synth_rec``) with ``model=iresnet18``
   at 112 x 112, B = 256, M = 8192, a few hundred steps, once per sampler (full, random,
   annoy, hnsw, exact): samples/s and peak device memory from the ``StepStats`` callback
   (``callbacks/step_stats.py``), which the run rewrites every 10 steps, so a run stopped by
   its time limit still reports.

Each run is its own process under its own limit (``bench.gpu.proc``); the limits are
cumulative shares of ``--budget``. ``--dry-run``: CPU, the tiny demo for 2 steps, a 256-class
32 px rec with the tiny backbone, and the five sampler runs as one ``train.py -m`` sweep
(one interpreter start instead of five, to stay CI-sized). Checkpoints and data go to
``--work``; the small files (step_stats.json, metrics.csv, train.log) are copied to ``--out``.

    python -m bench.gpu.train_runs --out gpu_results/train --work /tmp/gpu_check --budget 200
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from bench.gpu.proc import Deadlines, run_bounded

REPO = Path(__file__).resolve().parents[2]
SAMPLERS = ("full", "random", "annoy", "hnsw", "exact")
STATS = "+callbacks.step_stats._target_=callbacks.step_stats.StepStats"
STATS_PATH = "+callbacks.step_stats.path=${paths.output_dir}/step_stats.json"
# the tiny demo of the tests (tests/conftest.py TINY_DEMO), for the dry run
TINY_DEMO = [
    "data.demo_kwargs.num_classes=64",
    "data.demo_kwargs.images_per_class=4",
    "data.demo_kwargs.num_pairs=40",
    "+data.demo_kwargs.num_unseen=16",
    "+data.demo_kwargs.images_per_unseen=4",
    "data.batch_size=32",
    "model.embedding_dim=32",
    "sampler.num=48",
]


def plan(dry_run: bool) -> dict[str, Any]:
    """Sizes of the runs: the real GPU check, or the CPU dry run."""
    if dry_run:
        return {
            "trainer": "trainer=cpu",
            "threads": 1,
            "num_classes": 256,
            "image_size": 32,
            "model": "tiny",
            "batch": 16,
            "num": 64,
            "steps": 2,
            "workers": 0,
            "warmup": 0,
            "demo": [*TINY_DEMO, "trainer.max_steps=2", "trainer.limit_val_batches=2"],
        }
    workers = max(2, min(12, (os.cpu_count() or 4) - 2))
    return {
        "trainer": "trainer=gpu",
        "num_classes": 100_000,
        "image_size": 112,
        "model": "iresnet18",
        "batch": 256,
        "num": 8192,
        "steps": 300,
        "workers": workers,
        "warmup": 10,
        "threads": None,
        "demo": ["trainer.max_epochs=1"],
    }


def rec_overrides(p: dict[str, Any], rec: Path) -> list[str]:
    """Everything but the sampler and the run directory, for one synthetic-rec run."""
    model = [f"model={p['model']}"] + (["model.input_size=32"] if p["model"] == "tiny" else [])
    return [
        p["trainer"],
        "data=rec",
        f"data.path={rec}",
        *model,
        f"data.image_size={p['image_size']}",
        "~experiment",
        "logger=csv",
        f"sampler.num={p['num']}",
        f"data.batch_size={p['batch']}",
        f"data.num_workers={p['workers']}",
        "data.bins=[]",
        f"trainer.max_steps={p['steps']}",
        "trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=10",
        "trainer.enable_progress_bar=false",
        "optim.warmup_steps=20",
        "callbacks.index_rebuild.interval=100",
        f"torch_threads={p['threads'] or 'null'}",
        STATS,
        STATS_PATH,
        f"+callbacks.step_stats.warmup={p['warmup']}",
    ]


def sampler_knobs(sampler: str) -> list[str]:
    # a lean hnsw graph: the first build is synchronous and must not eat the run's limit
    return ["sampler.m=8", "sampler.ef_construction=40"] if sampler == "hnsw" else []


def collect(run_dir: Path, dest: Path) -> dict[str, Any]:
    """Copy the run's small files to ``dest``; -> StepStats numbers and the first index build
    (from ``dest/console.log``, where train.py's output went)."""
    dest.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    stats = run_dir / "step_stats.json"
    if stats.exists():
        shutil.copy(stats, dest / "step_stats.json")
        out.update(json.loads(stats.read_text()))
    for csv in sorted(run_dir.glob("csv/*/metrics.csv"))[-1:]:
        shutil.copy(csv, dest / "metrics.csv")
    if (run_dir / "train.log").exists():
        shutil.copy(run_dir / "train.log", dest / "train.log")
    console = dest / "console.log"
    text = console.read_text(errors="replace") if console.exists() else ""
    m = re.search(r"built \w+ index over \d+ classes in ([\d.]+)s", text)
    if m:
        out["first_index_build_s"] = float(m.group(1))
    return out


def final_metric(log: Path) -> dict[str, Any]:
    """``final <name> = <value>`` as train.py prints it, from the run's console log."""
    text = log.read_text(errors="replace") if log.exists() else ""
    m = re.findall(r"^final (\S+) = (\S+)", text, flags=re.M)
    return {"metric": m[-1][0], "value": float(m[-1][1])} if m else {}


class Report:
    """train_runs.json, rewritten after every run."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"meta": meta, "demo": None, "rec": {"runs": []}}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def run_demo(py: str, p: dict, work: Path, out: Path, limit: float, env: dict) -> dict[str, Any]:
    run_dir = work / "runs" / "demo"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        py,
        "train.py",
        p["trainer"],
        "logger=csv",
        "trainer.enable_progress_bar=false",
        *p["demo"],
        f"hydra.run.dir={run_dir}",
        STATS,
        STATS_PATH,
        f"torch_threads={p['threads'] or 'null'}",
        f"+callbacks.step_stats.warmup={p['warmup']}",
    ]
    ran = run_bounded(cmd, limit, out / "demo" / "console.log", cwd=REPO, env=env)
    return {
        **ran.asdict(),
        **collect(run_dir, out / "demo"),
        **final_metric(out / "demo" / "console.log"),
    }


def run_rec(
    py: str, p: dict, sampler: str, rec: Path, work: Path, out: Path, limit: float, env: dict
) -> dict[str, Any]:
    run_dir = work / "runs" / f"rec_{sampler}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        py,
        "train.py",
        *rec_overrides(p, rec),
        f"sampler={sampler}",
        *sampler_knobs(sampler),
        f"hydra.run.dir={run_dir}",
    ]
    ran = run_bounded(cmd, limit, out / "rec" / sampler / "console.log", cwd=REPO, env=env)
    return {"sampler": sampler, **ran.asdict(), **collect(run_dir, out / "rec" / sampler)}


def run_rec_sweep(
    py: str,
    p: dict,
    samplers: list[str],
    rec: Path,
    work: Path,
    out: Path,
    limit: float,
    env: dict,
) -> list[dict[str, Any]]:
    """All samplers in one ``train.py -m`` process (dry run); job i runs ``samplers[i]``."""
    sweep = work / "runs" / "rec_sweep"
    shutil.rmtree(sweep, ignore_errors=True)
    cmd = [
        py,
        "train.py",
        "-m",
        *rec_overrides(p, rec),
        f"sampler={','.join(samplers)}",
        f"hydra.sweep.dir={sweep}",
    ]
    ran = run_bounded(cmd, limit, out / "rec" / "sweep_console.log", cwd=REPO, env=env)
    runs = []
    for i, sampler in enumerate(samplers):
        job = sweep / str(i)
        result = json.loads((job / "job_result.json").read_text()) if job.exists() else {}
        status = result.get("status", ran.status)
        runs.append(
            {
                "sampler": sampler,
                **ran.asdict(),
                "status": "ok" if status == "completed" else status,
                **collect(job, out / "rec" / sampler),
            }
        )
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--budget", type=float, default=220.0, help="seconds for all runs")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    args = ap.parse_args(argv)
    p = plan(args.dry_run)
    py = sys.executable
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",
        "HF_SOFTMAX_CACHE": str(args.work / "cache"),
    }
    caps = {"demo": 60.0, "rec_data": 20.0, **{s: 28.0 for s in args.samplers}}
    scale = args.budget / sum(caps.values())
    clock = Deadlines({k: v * scale for k, v in caps.items()})
    report = Report(args.out / "train_runs.json", {"dry_run": args.dry_run, **p})

    report.data["demo"] = run_demo(py, p, args.work, args.out, clock.left("demo"), env)
    report.save()

    from bench.gpu.synth_rec import write_synthetic_rec

    rec = write_synthetic_rec(
        args.work / f"rec{p['num_classes']}", p["num_classes"], 1, p["image_size"]
    )
    report.data["rec"]["dataset"] = {
        **json.loads((rec / "meta.json").read_text()),
        "path": str(rec),
    }
    report.save()
    if args.dry_run:
        limit = clock.left(args.samplers[-1])
        report.data["rec"]["runs"] = run_rec_sweep(
            py, p, args.samplers, rec, args.work, args.out, limit, env
        )
    else:
        for s in args.samplers:
            report.data["rec"]["runs"].append(
                run_rec(py, p, s, rec, args.work, args.out, clock.left(s), env)
            )
            report.save()
    report.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
