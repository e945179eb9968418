"""What every bench script shares: timing splits, device sync and sampler configs.

Every bench script writes a JSON result (``docs/bench/<name>.json``) and a Markdown fragment;
``bench.all`` stitches the fragments into ``docs/benchmarks.md``. The rest of the shared
pieces live by idea: ``bench.paths``, ``bench.memory``, ``bench.synthetic``,
``bench.run_meta``, ``bench.formatting``, ``bench.output``; their names are re-exported
here, so ``from bench.common import ...`` keeps working for every script.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.formatting import fmt_bytes, fmt_count, fmt_ratio, fmt_seconds, markdown_table
from bench.memory import (
    PeakMemory,
    free_memory,
    mem_available,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
)
from bench.output import pyplot, save_figure, write_json
from bench.paths import CONF_SAMPLER, DOCS, OUT_DIR, REPO
from bench.run_meta import (
    RunClock,
    loadavg,
    machine_info,
    resident_mib,
    setup_logging,
    setup_run,
    steal_seconds,
)
from bench.synthetic import family_rows, features_near

__all__ = [
    "CONF_SAMPLER",
    "DOCS",
    "OUT_DIR",
    "REPO",
    "PeakMemory",
    "RunClock",
    "Stopwatch",
    "family_rows",
    "features_near",
    "fmt_bytes",
    "fmt_count",
    "fmt_ratio",
    "fmt_seconds",
    "free_memory",
    "loadavg",
    "resident_mib",
    "steal_seconds",
    "machine_info",
    "markdown_table",
    "mem_available",
    "peak_rss_bytes",
    "pyplot",
    "reset_peak_rss",
    "rss_bytes",
    "sampler_config",
    "save_figure",
    "setup_logging",
    "setup_run",
    "sync",
    "write_json",
]


class Stopwatch:
    """Accumulates named time splits: ``with sw("select"): ...``."""

    def __init__(self) -> None:
        self.splits: dict[str, list[float]] = {}
        self._name: str | None = None
        self._t0 = 0.0

    def __call__(self, name: str) -> Stopwatch:
        self._name = name
        return self

    def __enter__(self) -> Stopwatch:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._name is not None
        self.splits.setdefault(self._name, []).append(time.perf_counter() - self._t0)

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.splits.items()}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def sampler_config(name: str, num: int, **overrides: Any) -> dict[str, Any]:
    """The sampler config node as training uses it: conf/sampler/<name>.yaml + overrides."""
    cfg: dict[str, Any] = {"name": name}
    path = CONF_SAMPLER / f"{name}.yaml"
    if path.exists():
        from omegaconf import OmegaConf

        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        if isinstance(loaded, dict):
            cfg.update({k: v for k, v in loaded.items() if not str(k).startswith("_")})
    cfg.update(overrides)
    cfg["name"] = name
    cfg["num"] = num
    return cfg
