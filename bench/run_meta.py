"""How a bench CLI starts (logging, torch threads) and what a run records about itself:
the machine (CPU, cores, RAM, versions, GPU), wall time and load average before and after.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import time
from typing import Any


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


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
    for mod in ("torch", "numpy", "annoy", "hnswlib", "faiss-cpu", "matplotlib"):
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


def steal_seconds() -> float:
    """CPU time the hypervisor took from this VM so far, all CPUs summed (/proc/stat's
    ``steal``; 0.0 where there is none): a step that waited without being descheduled in the
    guest lost it there."""
    try:
        with open("/proc/stat") as fh:
            return int(fh.readline().split()[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def resident_mib(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (/proc/<pid>/status's ``VmRSS``)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")


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
