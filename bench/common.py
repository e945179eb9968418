"""Shared helpers for the benchmark scripts: timing, memory, synthetic classes, tables, plots.

Every bench script writes a JSON result (``docs/bench/<name>.json``) and a Markdown fragment;
``bench.all`` stitches the fragments into ``docs/benchmarks.md``.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
OUT_DIR = DOCS / "bench"
CONF_SAMPLER = REPO / "conf" / "sampler"

log = logging.getLogger("bench")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


# --------------------------------------------------------------------------- timing


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


# --------------------------------------------------------------------------- memory


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(f"/proc/self/status: no {key!r} line")


def rss_bytes() -> int:
    """Current resident set size of this process (bytes); 0 where /proc is unavailable."""
    try:
        return _proc_status_kb("VmRSS") * 1024
    except (OSError, KeyError):
        return 0


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) so the next peak is per configuration."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    try:
        return _proc_status_kb("VmHWM") * 1024
    except (OSError, KeyError):
        return 0


class PeakMemory:
    """Peak memory above the level at entry: host RSS, plus CUDA allocator peak on a GPU.

    ``with PeakMemory(device) as pm: ...``; then ``pm.host_bytes`` / ``pm.cuda_bytes``.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.host_bytes = 0
        self.cuda_bytes = 0
        self._base = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        self._base = rss_bytes()
        reset_peak_rss()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda_base = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc: object) -> None:
        self.host_bytes = max(0, peak_rss_bytes() - self._base)
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.cuda_bytes = max(0, torch.cuda.max_memory_allocated() - self._cuda_base)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# --------------------------------------------------------------------------- synthetic classes


def family_rows(
    num_classes: int,
    dim: int,
    family_size: int = 10,
    spread: float = 0.35,
    seed: int = 0,
    scale: float = 1.0,
    chunk: int = 1 << 18,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Class vectors in families of near neighbours: (N, D) float32 rows of norm ``scale``.

    Row i belongs to family ``i // family_size``; its vector is the family centre (unit norm)
    plus ``spread`` times a unit-norm private offset, renormalised. This gives the index and
    the samplers realistic structure (hard negatives exist) instead of isotropic noise.
    Generated in chunks (families never straddle chunks), optionally into ``out``, so
    N = 10^7 does not need a second copy.
    """
    chunk = max(family_size, chunk - chunk % family_size)
    rows = out if out is not None else np.empty((num_classes, dim), dtype=np.float32)
    for start in range(0, num_classes, chunk):
        stop = min(num_classes, start + chunk)
        rng = np.random.default_rng((seed, start))
        nfam = math.ceil((stop - start) / family_size)
        centres = rng.standard_normal((nfam, dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        offs = rng.standard_normal((stop - start, dim), dtype=np.float32)
        offs /= np.linalg.norm(offs, axis=1, keepdims=True)
        block = centres[np.arange(stop - start) // family_size] + spread * offs
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        rows[start:stop] = block * scale
    return rows


def features_near(
    rows: np.ndarray, labels: np.ndarray, noise: float, rng: np.random.Generator
) -> np.ndarray:
    """Features (B, D) float32 near the (unit-normalised) rows of their labels plus noise."""
    centres = rows[labels].astype(np.float32, copy=True)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True) + 1e-12
    return centres + noise / math.sqrt(rows.shape[1]) * rng.standard_normal(
        centres.shape, dtype=np.float32
    )


# --------------------------------------------------------------------------- sampler configs


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


# --------------------------------------------------------------------------- machine & output


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, library versions, date and current load."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = 0
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    ram = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    versions: dict[str, str] = {"python": platform.python_version()}
    for mod in ("torch", "numpy", "annoy", "hnswlib", "matplotlib"):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod)
        except Exception:  # noqa: BLE001 - a missing optional package is reported, not fatal
            versions[mod] = "n/a"
    import torch

    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(ram / 2**30, 1),
        "versions": versions,
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def loadavg() -> tuple[float, float, float] | None:
    return os.getloadavg() if hasattr(os, "getloadavg") else None


# --------------------------------------------------------------------------- runs


def setup_run(threads: int | None = None) -> None:
    """Start of a bench CLI: logging, and ``torch.set_num_threads(threads)`` when given."""
    setup_logging()
    if threads:
        import torch

        torch.set_num_threads(threads)


class RunClock:
    """Wall time and load average of one bench run, from construction to ``meta()``."""

    def __init__(self) -> None:
        self.t_start = time.perf_counter()
        self.load_before = loadavg()

    def meta(self, **fields: Any) -> dict[str, Any]:
        """The result's ``meta``: ``fields``, then seconds, torch threads and the load
        average before and after."""
        import torch

        return {
            **fields,
            "seconds": time.perf_counter() - self.t_start,
            "torch_threads": torch.get_num_threads(),
            "loadavg_before": self.load_before,
            "loadavg_after": loadavg(),
        }


def fmt_seconds(s: float) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "–"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 100:
        return f"{s:.2f} s"
    return f"{s:.0f} s"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "–"
    if b < 2**20:
        return f"{b / 2**10:.0f} KiB"
    if b < 2**30:
        return f"{b / 2**20:.0f} MiB"
    return f"{b / 2**30:.2f} GiB"


def fmt_ratio(r: float | None) -> str:
    if r is None or (isinstance(r, float) and math.isnan(r)):
        return "–"
    if r >= 100:
        return f"{r:.0f}×"
    if r >= 10:
        return f"{r:.1f}×"
    return f"{r:.2f}×"


def fmt_count(n: int) -> str:
    exp = math.log10(n) if n > 0 else 0
    return f"10^{exp:.0f}" if n > 0 and abs(exp - round(exp)) < 1e-9 else f"{n:,}"


def markdown_table(
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[tuple[str, str, Callable[[Any], str] | None]],
) -> str:
    """A Markdown table; ``columns`` = (key, header, formatter or None for str)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("–" if value is None else (fmt(value) if fmt else str(value)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(name: str, payload: Any, out_dir: Path = OUT_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def pyplot():
    """matplotlib.pyplot with the Agg backend (no display on the benchmark machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, name: str, out_dir: Path = OUT_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def free_memory() -> None:
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
