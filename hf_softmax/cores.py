"""The cores this process may run on: its CPU affinity, not the machine's core count.

A job under a cgroup cpuset, ``taskset`` or a Slurm allocation sees every core of the host in
``os.cpu_count()`` (and annoy's and hnswlib's ``-1``, which ask the C++ runtime's
``hardware_concurrency``), but may run on a few of them: 64 query threads sharing 8 allowed
cores spend the step switching. Every "-1 = all cores" knob (annoy ``n_jobs`` /
``query_threads``, hnsw ``num_threads``, faiss ``threads`` / ``query_threads``, the build
worker's default, evaluation's decode threads) resolves through ``usable_cores``.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The number of cores this process may be scheduled on (at least 1)."""
    if hasattr(os, "sched_getaffinity"):  # Linux: the affinity mask (cpuset, taskset)
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def threads_for(knob: int) -> int:
    """A thread-count knob: a positive value as given, 0 or -1 (all) -> ``usable_cores()``."""
    return int(knob) if int(knob) > 0 else usable_cores()
