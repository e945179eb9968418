"""Hydra callback that tabulates a multirun: one row per job, one metric per job.

Each job writes ``job_result.json`` into its own output directory when it ends (this also
works for launchers that run jobs in other processes); at the end of the multirun the
results found under the sweep directory are collected into ``summary.md`` and
``summary.csv`` there. The metric is whatever the task function returned (``train.py``
returns the final verification accuracy); when the job also wrote ``final_metrics.json``
(``train.py`` does: verification accuracy per set, closed-set top-1, train accuracy, wall time)
those numbers become columns too, so ``python train.py -m sampler=annoy,random`` compares the
samplers side by side.

Enable in a Hydra config::

    hydra:
      callbacks:
        sweep_summary:
          _target_: hf_softmax.sweep.SweepSummary
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

RESULT_FILE = "job_result.json"
FINAL_METRICS_FILE = "final_metrics.json"  # written by train.py into each run directory


@dataclass
class JobResult:
    num: int
    overrides: list[str]
    status: str  # "completed" | "failed"
    metric: float | None
    output_dir: str
    error: str | None = None
    final: dict[str, float] = field(default_factory=dict)  # the job's final_metrics.json


def _metric_value(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, dict):  # a dict of metrics: take the first numeric one
        for v in value.values():
            m = _metric_value(v)
            if m is not None:
                return m
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _varying_overrides(overrides: list[list[str]]) -> list[list[str]]:
    """Per job, only the overrides whose key takes different values across the jobs."""
    if len(overrides) < 2:
        return overrides
    parsed = [dict(o.split("=", 1) if "=" in o else (o, "") for o in ov) for ov in overrides]
    keys = {k for p in parsed for k in p}
    varying = {k for k in keys if len({p.get(k) for p in parsed}) > 1}
    return [[o for o in ov if o.split("=", 1)[0] in varying] for ov in overrides]


def _read_final(output_dir: Path) -> dict[str, float]:
    """Numeric entries of ``<output_dir>/final_metrics.json`` ({} if absent or unreadable)."""
    path = output_dir / FINAL_METRICS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("sweep summary: cannot read %s: %s", path, e)
        return {}
    return {k: v for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _fmt(value: float | None, key: str = "") -> str:
    """Table cell: counts as integers, seconds (``*_s``) to 0.1 s, others with 4 decimals."""
    if value is None or math.isnan(value):
        return ""
    if isinstance(value, int):
        return str(value)
    return f"{value:.1f}" if key.endswith("_s") else f"{value:.4f}"


def write_summary(sweep_dir: Path, metric_name: str = "metric") -> list[JobResult]:
    """Collect ``*/job_result.json`` under ``sweep_dir`` into ``summary.md`` + ``summary.csv``."""
    results = []
    for path in sorted(sweep_dir.glob(f"**/{RESULT_FILE}")):
        try:
            results.append(JobResult(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError) as e:
            log.warning("sweep summary: cannot read %s: %s", path, e)
    results.sort(key=lambda r: r.num)
    columns: list[str] = []  # final_metrics keys, in the order the jobs wrote them
    for r in results:
        columns += [k for k in r.final if k not in columns]
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["job", "overrides", metric_name, *columns, "status", "output_dir"])
        for r in results:
            w.writerow(
                [r.num, " ".join(r.overrides), "" if r.metric is None else r.metric,
                 *(r.final.get(c, "") for c in columns), r.status, r.output_dir]
            )  # fmt: skip
    shown = _varying_overrides([r.overrides for r in results])
    lines = [
        "| " + " | ".join(["job", "overrides", metric_name, *columns, "status"]) + " |",
        "|---:|---|---:|" + "---:|" * len(columns) + "---|",
    ]
    for r, ov in zip(results, shown, strict=True):
        overrides = " ".join(ov) or "(none)"
        cells = [_fmt(r.metric), *(_fmt(r.final.get(c), c) for c in columns)]
        lines.append(f"| {r.num} | `{overrides}` | " + " | ".join(cells) + f" | {r.status} |")
    done = [r for r in results if r.metric is not None and not math.isnan(r.metric)]
    if done:
        best = max(done, key=lambda r: r.metric)
        best_ov = shown[results.index(best)]
        lines += ["", f"Best {metric_name}: {best.metric:.4f} (job {best.num}: "
                  f"`{' '.join(best_ov)}`)"]  # fmt: skip
    common = sorted(set(results[0].overrides) - {o for ov in shown for o in ov}) if results else []
    if common:
        lines += ["", "Common overrides: `" + " ".join(common) + "`"]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return results


def _job_error(job_return: JobReturn) -> str:
    """repr of a failed job's exception: ``return_value`` raises it (and notes the failure on
    stderr, which Hydra's launcher has already done)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            _ = job_return.return_value
    except Exception as exc:  # the job's own exception
        return repr(exc)
    return "unknown error"


class SweepSummary(Callback):
    """Writes the per-job result file and, after a multirun, the summary table."""

    def __init__(self, metric_name: str = "metric") -> None:
        self.metric_name = metric_name

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hydra_cfg = job_return.hydra_cfg.hydra if job_return.hydra_cfg else config.hydra
        # working_dir is the process cwd unless hydra.job.chdir: use the job's output dir
        output_dir = Path(hydra_cfg.runtime.output_dir)
        if job_return.status == JobStatus.COMPLETED:
            status, metric, error = "completed", _metric_value(job_return.return_value), None
        else:
            status, metric, error = "failed", None, _job_error(job_return)
        result = JobResult(
            num=int(hydra_cfg.job.get("num", 0) or 0),
            overrides=list(job_return.overrides or []),
            status=status,
            metric=metric,
            output_dir=str(output_dir),
            error=error,
            final=_read_final(output_dir) if status == "completed" else {},
        )
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RESULT_FILE).write_text(json.dumps(asdict(result), indent=2))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            log.warning("sweep summary: no sweep directory %s", sweep_dir)
            return
        results = write_summary(sweep_dir, self.metric_name)
        table = (sweep_dir / "summary.md").read_text()
        log.info("sweep summary of %d jobs (%s):\n%s", len(results), sweep_dir / "summary.md",
                 table)  # fmt: skip
