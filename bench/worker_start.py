"""Build worker start: seconds to a worker's first build and its resident memory.

The trainer's main module imports what ``train.py`` does (Lightning, Hydra, wandb), then
starts a real ``BuildWorker`` (``background: process``) and has it build a small annoy
index: the time is the worker's start plus that build, the memory the worker's VmRSS once
it has replied. A worker that imported the main script again (multiprocessing's spawn)
paid for those imports; ``python -m hf_softmax.worker_process`` does not.

    python -m bench.worker_start --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import hydra  # noqa: F401  (what train.py's main module imports)
import numpy as np
import omegaconf  # noqa: F401
import pytorch_lightning  # noqa: F401
import wandb  # noqa: F401

from bench.common import RunClock, resident_mib, write_json
from hf_softmax.build_worker import BuildWorker
from hf_softmax.samplers.annoy import AnnoySampler


def run(repeats: int = 3, n: int = 1000, dim: int = 64) -> dict[str, Any]:
    clock = RunClock()
    rows = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    seconds, rss = [], []
    for _ in range(repeats):
        worker = BuildWorker(AnnoySampler(n, 100, "ip", 0, ntrees=2, n_jobs=1), 1)
        try:
            t0 = time.perf_counter()
            worker.build("build", rows, np.empty(0, np.int64))
            seconds.append(time.perf_counter() - t0)
            rss.append(resident_mib(worker.pid))
        finally:
            worker.close()
    return {
        "first_build_s": seconds,
        "worker_rss_mib": rss,
        "median_first_build_s": statistics.median(seconds),
        "median_worker_rss_mib": statistics.median(rss),
        "meta": clock.meta(rows=n, dim=dim),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="worker_start")
    args = p.parse_args(argv)
    data = run(args.repeats)
    write_json(args.out, data)
    print(f"worker start + first build: median {data['median_first_build_s']:.2f} s; "
          f"worker resident {data['median_worker_rss_mib']:.0f} MiB")  # fmt: skip
    return data


if __name__ == "__main__":
    main()
