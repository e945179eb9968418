"""Host and device memory of a bench process: RSS, peaks per configuration, what is free.

Read from ``/proc`` (0 where it is unavailable); CUDA peaks from torch's allocator.
"""

from __future__ import annotations

import gc

from hf_softmax.index_files import available_bytes


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


def mem_available() -> int:
    """MemAvailable of the machine (bytes); huge where /proc/meminfo is unavailable."""
    available = available_bytes()
    return 1 << 62 if available is None else available


def free_memory() -> None:
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
