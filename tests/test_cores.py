"""Every "-1 = all cores" knob counts the cores this process may run on (its affinity, as a
cpuset, taskset or Slurm sets it), not the host's (``hf_softmax.cores``)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PINNED = """
import os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # before torch starts its threads
import torch
from hf_softmax.cores import threads_for, usable_cores
from hf_softmax.index_build import worker_threads
from hf_softmax.samplers.annoy import AnnoySampler
from hf_softmax.samplers.faiss import FaissSampler
from hf_softmax.samplers.hnsw import HNSWSampler

torch.set_num_threads(1)
annoy = AnnoySampler(1000, 50)  # n_jobs, query_threads: -1
faiss = FaissSampler(1000, 50)  # threads, query_threads: -1
print(usable_cores(), os.cpu_count(), threads_for(-1), threads_for(0), threads_for(3),
      annoy.query_threads, faiss.threads, faiss.query_threads, worker_threads(None))
hnsw = HNSWSampler(1000, 50, num_threads=-1)
import numpy as np
rows = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32)
hnsw.swap(hnsw.build_index(rows))
annoy.swap(annoy.build_index(rows))
print(hnsw.query(rows[:64], 4).shape, annoy.query(rows[:64], 4).shape)
"""


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux CPU affinity and at least 2 allowed cores",
)
def test_all_cores_means_the_cores_this_process_may_use():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PINNED], env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout.split("\n")  # fmt: skip
    usable, host, *resolved = (int(v) for v in out[0].split())
    assert usable == 1 and host >= 2  # the host has more cores than the process may use
    assert resolved == [1, 1, 3, 1, 1, 1, 1]
    assert out[1] == "(64, 4) (64, 4)"  # hnsw and annoy build and query on the one core
