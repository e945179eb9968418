"""The build worker as a ``python -m`` child (``hf_softmax.worker_process``) and what
``background: auto`` chooses: a worker process for large indexes, a thread or the step
otherwise. Real samplers, real workers, real scripts run as a user runs them."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_softmax.classifier import SampledClassifier
from hf_softmax.heads import build_head
from hf_softmax.index_build import PROCESS_MIN_ELEMENTS, auto_background, worker_threads
from hf_softmax.index_maintainer import IndexMaintainer
from hf_softmax.samplers.annoy import AnnoySampler
from hf_softmax.samplers.exact import ExactSampler
from hf_softmax.samplers.hnsw import HNSWSampler

ROOT = Path(__file__).resolve().parents[1]
SHM_ROOM = (
    os.path.isdir("/dev/shm")
    and os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    > 8 * PROCESS_MIN_ELEMENTS * 4
)
needs_shm = pytest.mark.skipif(not SHM_ROOM, reason="needs /dev/shm with room for the block")

# A user's script with no ``if __name__ == "__main__":`` guard: a spawned worker would import
# it again and start over; the ``python -m`` worker never imports it.
UNGUARDED = """
import sys, time
import numpy as np
from hf_softmax.build_worker import BuildWorker
from hf_softmax.samplers.annoy import AnnoySampler

print("script body runs", flush=True)
rows = np.random.default_rng(0).standard_normal((500, 16)).astype(np.float32)
sampler = AnnoySampler(500, 50, "ip", 0, ntrees=2, n_jobs=1)
worker = BuildWorker(sampler, 1)
index, done, _ = worker.build("build", rows, np.empty(0, np.int64))
print("built", done, index.get_n_items(), "worker", worker.pid, flush=True)
if len(sys.argv) > 1:  # stay alive until killed
    time.sleep(600)
worker.close()
"""


def test_auto_background_builds_large_indexes_in_a_worker_process():
    big, small = PROCESS_MIN_ELEMENTS, PROCESS_MIN_ELEMENTS - 1
    assert auto_background(ExactSampler(100, 10), big)[0] == "inline"
    assert auto_background(AnnoySampler(100, 10), small)[0] == "thread"
    hnsw_feature = HNSWSampler(100, 10, num_threads=1)
    assert auto_background(hnsw_feature, big) == (
        "thread", "its index would load into the trainer under the GIL")  # fmt: skip
    if SHM_ROOM:
        assert auto_background(AnnoySampler(100, 10), big)[0] == "process"
        assert auto_background(HNSWSampler(100, 10, query="label"), big)[0] == "process"
    # more than /dev/shm holds: a thread, and the reason names the fix
    mode, why = auto_background(AnnoySampler(100, 10), 2**50)
    assert mode == "thread" and ("--shm-size" in why or "no /dev/shm" in why)


@needs_shm
def test_auto_rebuilds_a_large_annoy_index_in_a_worker_and_serves_it(caplog):
    n, d = PROCESS_MIN_ELEMENTS // 256, 256  # the smallest size that gets a worker
    sampler = AnnoySampler(n, 300, "ip", 0, ntrees=1, n_jobs=1)
    clf = SampledClassifier(n, d, build_head("linear"), sampler, seed=0, init_std=0.05)
    m = IndexMaintainer(clf, interval=100, background="auto", probe_every=0)
    with caplog.at_level(logging.INFO, logger="hf_softmax.index_build"):
        m.start(0)
    try:
        assert m.mode() == "process" and m.worker is not None and m.worker.pid_alive()
        # build_threads null: the cores torch's threads leave free, annoy's n_jobs included
        assert m.worker.build_threads == worker_threads(None) >= 1
        assert m.worker.spec[1]["n_jobs"] == m.worker.build_threads
        assert "background=auto rebuilds in a build worker process" in caplog.text
        m.on_step_start(100)
        m.wait(100)
        assert m.failures == 0 and m.history[-1].background and m.mode() == "process"
        out = clf(torch.randn(8, d), torch.arange(8))
        assert out.active.num_index > 0 and clf.sampler.index.get_n_items() == n
    finally:
        m.close()


def test_the_worker_takes_the_cores_torch_leaves_free_unless_told():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert worker_threads(None) == max(1, cores - 1)
        torch.set_num_threads(cores)  # torch takes every core: the worker still gets one
        assert worker_threads(None) == 1
        assert worker_threads(3) == 3
    finally:
        torch.set_num_threads(before)


def _run(script: Path, *args: str, stderr: int = subprocess.PIPE) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(script), *args]
    return subprocess.Popen(cmd, cwd=script.parent, env=env, stdout=subprocess.PIPE,
                            stderr=stderr, text=True)  # fmt: skip


def test_a_worker_starts_from_a_main_script_without_a_guard(tmp_path):
    """multiprocessing's spawn would import the script again in the worker, which then starts
    a worker of its own; the ``python -m`` worker runs the script's body once."""
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED)
    proc = _run(script)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.count("script body runs") == 1 and "built build 500" in out


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # exited, not yet reaped by whoever adopted it


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc (Linux)")
def test_the_worker_exits_when_its_trainer_is_killed(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(UNGUARDED)
    proc = _run(script, "stay", stderr=subprocess.DEVNULL)
    line = proc.stdout.readline()
    while line and not line.startswith("built"):
        line = proc.stdout.readline()
    worker = int(line.split()[-1])
    assert not _gone(worker)
    proc.send_signal(signal.SIGKILL)  # no finalizer runs: the worker must notice alone
    proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    while not _gone(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(worker)


def test_the_worker_leaves_the_trainers_shared_block_alone_when_it_exits():
    """The worker opens the trainer's block untracked: its exit does not unlink it (a
    tracked block was unlinked by the worker's resource tracker), so a restarted worker
    gets the same block."""
    rows = np.random.default_rng(1).standard_normal((400, 8)).astype(np.float32)
    from hf_softmax.build_worker import BuildWorker

    worker = BuildWorker(AnnoySampler(400, 40, ntrees=2, n_jobs=1), 1)
    try:
        worker.build("build", rows, np.empty(0, np.int64))
        block, first = worker.shared_block, worker.pid
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while worker.pid_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # a tracker of the worker's would unlink the block now
        assert os.path.exists(f"/dev/shm/{block}")
        index, _, _ = worker.build("build", rows, np.empty(0, np.int64))  # a new worker
        assert worker.pid != first and worker.shared_block == block and index.get_n_items() == 400
    finally:
        worker.close()
    assert not os.path.exists(f"/dev/shm/{block}")


def test_the_worker_keeps_the_trainers_block_mapped_between_builds():
    """The worker maps the reused block once: after a build it is still in the worker's
    memory map (mapped afresh per build, its pages were faulted in again each time), and a
    second build over other rows sees those rows through the same mapping."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/<pid>/maps")
    from hf_softmax.build_worker import BuildWorker

    rng = np.random.default_rng(2)
    rows = [rng.standard_normal((400, 8)).astype(np.float32) for _ in range(2)]
    worker = BuildWorker(AnnoySampler(400, 40, ntrees=2, n_jobs=1), 1)
    try:
        for r in rows:
            index, _, _ = worker.build("build", r, np.empty(0, np.int64))
            time.sleep(0.3)  # the worker replies first, then would have closed it
            maps = Path(f"/proc/{worker.pid}/maps").read_text()
            assert maps.count(f"/dev/shm/{worker.shared_block}") == 1
            got = np.array([index.get_item_vector(i) for i in (0, 399)], np.float32)
            np.testing.assert_allclose(got, r[[0, 399]], rtol=1e-6)
    finally:
        worker.close()


def test_a_worker_starts_where_its_folder_path_is_too_long_for_a_socket_file(tmp_path):
    """A long ``TMPDIR`` (cluster scratch paths) would pass the Unix socket's 108-byte path
    limit: the worker listens on an abstract address instead (Linux)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("abstract socket addresses are Linux's")
    from hf_softmax.build_worker import sampler_spec
    from hf_softmax.worker_process import WorkerProcess, socket_address

    folder = tmp_path / ("long-scratch-directory-" * 6)
    folder.mkdir()
    assert socket_address(str(folder)).startswith("\0")
    proc = WorkerProcess(str(folder), sampler_spec(AnnoySampler(100, 10, n_jobs=1), 1), 1)
    try:
        proc.conn.send(None)  # the worker's loop ends on None
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        proc.kill()


def test_memory_env_keeps_freed_memory_unless_the_user_says_otherwise():
    from hf_softmax.worker_process import memory_env

    keep = memory_env("keep", {"PATH": "/bin"})
    assert keep["PATH"] == "/bin" and keep["MALLOC_MMAP_MAX_"] == "0"
    assert int(keep["MALLOC_TRIM_THRESHOLD_"]) >= 2**40
    assert memory_env("keep", {"MALLOC_MMAP_MAX_": "8"})["MALLOC_MMAP_MAX_"] == "8"
    assert memory_env("release", {"PATH": "/bin"}) == {"PATH": "/bin"}


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no {field}")


@pytest.mark.parametrize("memory", ["keep", "release"])
def test_a_keeping_worker_holds_its_build_memory_for_the_next_build(memory):
    """``worker_memory: keep``: the worker runs with glibc told to keep freed memory, so the
    ~70 MB of annoy nodes it frees after a build stay resident for the next build, which
    reuses them (no growth); ``release``: they go back to the system after each build."""
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/<pid>/status and environ")
    from hf_softmax.build_worker import BuildWorker

    n = 200_000
    rows = np.random.default_rng(4).standard_normal((n, 64)).astype(np.float32)
    worker = BuildWorker(AnnoySampler(n, 40, ntrees=2, n_jobs=1), 1, memory)
    resident = []
    try:
        for _ in range(2):
            index, _, _ = worker.build("build", rows, np.empty(0, np.int64))
            assert index.get_n_items() == n
            del index
            time.sleep(0.5)  # the worker replies first, then frees its index
            env = Path(f"/proc/{worker.pid}/environ").read_bytes().split(b"\0")
            assert (b"MALLOC_MMAP_MAX_=0" in env) == (memory == "keep")
            resident.append(_status_kib(worker.pid, "VmRSS"))
            below_peak = _status_kib(worker.pid, "VmHWM") - resident[-1]
            if memory == "keep":
                assert below_peak < 16 * 1024  # KiB: the nodes stayed
            else:
                assert below_peak > 32 * 1024  # given back
        assert resident[1] < resident[0] + 8 * 1024  # the second build reused the first's
    finally:
        worker.close()


def test_a_faiss_index_file_loads_into_memory_where_it_fits_else_mmapped(tmp_path):
    """``load_index``: a faiss ivf file is read into memory when it takes at most a quarter
    of the available memory (mmapped, faiss searched its lists 2x slower), else its lists
    are mmapped; either way it finds what the index it was saved from finds."""
    from hf_softmax.index_files import faiss_in_memory, load_index, save_index
    from hf_softmax.samplers.faiss import FaissSampler

    assert faiss_in_memory(1 << 30, 8 << 30) and not faiss_in_memory(3 << 30, 8 << 30)
    assert not faiss_in_memory(1, None)  # available memory unknown: mmap
    rows = np.random.default_rng(5).standard_normal((2000, 16)).astype(np.float32)
    sampler = FaissSampler(2000, 40, nlist=20, nprobe=4, threads=1, device="cpu")
    index = sampler.build_index(rows)
    kind, info = save_index(index, tmp_path / "ivf")
    loaded = load_index(kind, tmp_path / "ivf", info, "ip")  # a few KB: into memory
    lists = sampler.faiss.downcast_InvertedLists(sampler.faiss.extract_index_ivf(loaded).invlists)
    assert type(lists).__name__ == "ArrayInvertedLists"
    feats = rows[:64] + 0.1
    found = sampler.query_index(loaded, feats, 5)
    assert np.array_equal(found, sampler.query_index(index, feats, 5))
