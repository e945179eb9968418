"""``python -m bench.hangul run``: train samplers through ``train.py`` on the Hangul set; score.

Each job is one real ``python train.py`` (the project's configs, a step budget, same seed and
data order for every sampler) followed by one ``python evaluate.py`` on its checkpoint:

- closed-set top-1 / top-5 over all N classifier rows on ``test.rec`` (the held-out faces);
- 10-fold verification accuracy on ``pairs.bin`` (easy) and ``pairs_lookalike.bin``;
- the training wall time (the ``train.py`` process, start-up included) and the mean
  ``index/recall@k`` the run logged.

Results accumulate in ``docs/bench/hangul.json`` (a job already there with the same command is
not run again unless ``--force``); ``bench.hangul.report`` renders the table and plot.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.hangul.run")

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "bench" / "hangul.json"

# The model and head of the measurements: a small 1-channel CNN, CosFace s=20 m=0.1.
BASE = [
    "data=rec",
    "data.image_size=32",
    "data.flip=false",
    "data.num_workers=1",
    "model=tiny",
    "model.in_channels=1",
    "+model.widths=[8,16,32,64]",
    "head=cosface",
    "head.scale=20",
    "head.margin=0.1",
    "+trainer.limit_val_batches=0",
    "logger=csv",
    "data.bins=[pairs,pairs_lookalike]",
]


@dataclass
class Job:
    """One training run: ``label`` names it in the table; ``overrides`` go to train.py."""

    label: str
    sampler: str
    fraction: float
    seed: int
    overrides: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        # a folder name Hydra's override grammar takes as one plain value
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.label.replace("/", "-").replace("=", ""))
        return f"{safe}-f{self.fraction:g}-s{self.seed}"


def num_active(fraction: float, num_classes: int, batch: int) -> int:
    """M for an active fraction of N; at least the batch size (every positive must fit)."""
    return max(int(round(fraction * num_classes)), batch)


def train_command(job: Job, data: Path, steps: int, batch: int, threads: int, out: Path,
                  num_classes: int) -> list[str]:  # fmt: skip
    m = num_active(job.fraction, num_classes, batch)
    return [
        sys.executable, "train.py", *BASE,
        f"data.path={data}", f"data.batch_size={batch}", f"sampler={job.sampler}",
        f"sampler.num={m}", f"trainer.max_steps={steps}", f"scheduler.total_steps={steps}",
        "trainer.max_epochs=-1",  # the step budget decides (experiment=demo stops at 2 epochs)
        f"seed={job.seed}", f"torch_threads={threads}", f"hydra.run.dir={out}",
        *job.overrides,
    ]  # fmt: skip


def evaluate_command(ckpt: Path, data: Path, out: Path) -> list[str]:
    return [
        sys.executable, "evaluate.py", f"ckpt={ckpt}", "data=rec", f"data.path={data}",
        "bins=[pairs,pairs_lookalike]", f"top1_rec={data / 'test.rec'}", "logger=none",
        f"out_dir={out}", "save_features=false", "plots=false", "data.num_workers=1",
    ]  # fmt: skip


def _run(cmd: list[str], log_path: Path) -> float:
    """Run ``cmd`` in the repository root, output to ``log_path``; -> wall seconds."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with log_path.open("w") as fh:
        done = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({done.returncode}); see {log_path}")
    return time.perf_counter() - t0


# what the logged recall was measured against (rows without the field: "updated rows", the
# probe before 2026-11-27, which counted the negatives the step had just pushed away as misses)
PROBE = "selected rows"


def logged_recall(run_dir: Path) -> float | None:
    """Mean of the ``index/recall@k`` values the run's CSV logger wrote (None if none)."""
    values: list[float] = []
    for path in run_dir.glob("csv/version_*/metrics.csv"):
        with path.open() as fh:
            for row in csv.DictReader(fh):
                for key, value in row.items():
                    if key.startswith("index/recall@") and value not in ("", None):
                        values.append(float(value))
    return sum(values) / len(values) if values else None


def row_rule(run_dir: Path) -> str:
    """How the run's classifier rows moved, from its composed config: "sphere" (a
    ``classifier.row_norm``: rows kept at a norm) or "free" (rows free to grow, the rule before
    row_norm existed; also ``sampler=full``, whose W is a plain parameter)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    sampled = cfg.sampler.get("_target_", "").split(".")[-1] != "FullSampler"
    return "sphere" if sampled and cfg.classifier.get("row_norm") is not None else "free"


def run_job(job: Job, cmd: list[str], run_dir: Path, data: Path) -> dict[str, Any]:
    """Train with ``cmd`` (its ``hydra.run.dir`` is ``run_dir``), evaluate the checkpoint on
    ``data``; -> the job's scores and times (run_all adds the budget)."""
    shutil.rmtree(run_dir, ignore_errors=True)  # a stale run's CSV would mix into the recall
    log.info("%s: %s", job.name, shlex.join(cmd[1:]))
    train_s = _run(cmd, run_dir / "train.out")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    _run(evaluate_command(ckpt, data, run_dir / "eval"), run_dir / "evaluate.out")
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())["metrics"]
    row = {
        "label": job.label,
        "sampler": job.sampler,
        "fraction": job.fraction,
        "seed": job.seed,
        "top1": metrics.get("test/top1"),
        "top5": metrics.get("test/top5"),
        "pairs": metrics.get("pairs/acc"),
        "lookalike": metrics.get("pairs_lookalike/acc"),
        "train_s": train_s,
        "recall": logged_recall(run_dir),
        "probe": PROBE,
        "rows": row_rule(run_dir),
    }
    log.info("%s: top1 %.4f lookalike %.4f (%.0f s)", job.name, row["top1"] or math.nan,
             row["lookalike"] or math.nan, train_s)  # fmt: skip
    return row


def load_results(path: Path = RESULTS) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"rows": []}


def save_results(results: dict[str, Any], path: Path = RESULTS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


def run_all(jobs: list[Job], data: Path, steps: int, batch: int, threads: int, work: Path,
            force: bool = False, results_path: Path = RESULTS) -> dict[str, Any]:  # fmt: skip
    """Run ``jobs`` one after another (never side by side: they would share the cores), keeping
    every finished row in ``results_path`` so an interrupted sweep resumes where it stopped."""
    from data.layout import read_layout
    from data.recordio import RecordReader

    layout = read_layout(RecordReader(data / "train.rec"))
    num_classes = int(layout.num_classes)
    results = load_results(results_path)
    results["data"] = str(data)
    for job in jobs:
        run_dir = work / job.name
        cmd = train_command(job, data, steps, batch, threads, run_dir, num_classes)
        text = shlex.join(cmd[1:])
        if not force and any(r.get("command") == text for r in results["rows"]):
            log.info("%s: already measured (use --force to rerun)", job.name)
            continue
        row = run_job(job, cmd, run_dir, data)
        row.update(num=num_active(job.fraction, num_classes, batch), steps=steps, batch=batch,
                   num_classes=num_classes, command=text)  # fmt: skip
        results["rows"] = [r for r in results["rows"] if r.get("command") != text] + [row]
        save_results(results, results_path)
    return results
