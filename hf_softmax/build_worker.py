"""BuildWorker: index builds in a separate process, so training never waits on them.

``background: process`` (``callbacks.index_rebuild``; ``auto`` at N·D >= 2^23) hands every
rebuild to one worker process (``worker_process``: ``python -m``, no re-import of the main
script). Per rebuild, in a thread of the training process that only copies and waits (both
release the GIL):

1. the live rows W (N, D) are copied straight into a ``multiprocessing.shared_memory``
   block (never pickled; no intermediate snapshot); the worker gets its name, the shape and
   the changed row ids. The block is made once and reused by every rebuild of that size:
   its pages are faulted in once, not per rebuild (copying 1 GB into fresh memory stalled a
   10^6-class step for 0.4 s), and the worker keeps it mapped (``shared_block``). A row a
   step writes meanwhile may be copied half-updated (as in a build thread; it is marked
   touched again);
2. the worker builds (or refreshes the index it built last: hnsw in place, the class's
   ``worker_knobs``) with its own threads, ``build_threads`` of them (annoy ``n_jobs``,
   hnsw ``num_threads``, faiss ``threads``; faiss on the CPU; the maintainer's default:
   the cores torch's threads leave free, ``index_build.worker_threads``), and saves it to a
   file;
3. the trainer loads the file (``index_files.load_index``: annoy mmapped, faiss read into
   memory where it fits a quarter of the available memory, else its ivf lists mmapped);
   the maintainer swaps it in at the next step start. hnswlib reads a graph whole under the
   GIL, so hnsw in feature mode builds in a thread (``index_build.background_mode``). In
   label mode (``sampler.query=label``) the worker hands back only the class-neighbour
   table of the fresh index (``<index file>.table.npy``, mmapped by the trainer; with a
   ``feature_share`` the index too; ``WorkerIndex`` stands for it otherwise). The worker
   frees its index once the reply is sent (hnsw keeps its graph for the next refresh); with
   ``worker_memory: keep`` its allocator keeps that memory for the next build
   (``worker_process.memory_env``: no fresh pages per rebuild).

The query effort that ``target_recall`` tunes in the trainer goes with every request.
Split the cores: ``torch_threads`` for the trainer, ``build_threads`` for the worker (also
its torch/OpenMP threads), e.g. ``torch_threads=1 callbacks.index_rebuild.build_threads=1``.

A worker that dies (killed, out of memory) fails that rebuild with an error naming its exit
code instead of hanging; the next rebuild starts a new worker (a full build). The trainer
never deletes an index file it mapped: the worker deletes the files of all builds but the
last when the next request comes (by then the trainer has dropped them), so the pages are
freed in the worker, not in a training step. ``close()`` stops the worker, frees the shared
block and removes its temporary directory (also at interpreter exit).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import shutil
import tempfile
import time
import traceback
import weakref
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_softmax.index_build import refreshes
from hf_softmax.index_files import (
    WorkerIndex,
    keep_last_files,
    load_index,
    save_index,
    table_path,
)
from hf_softmax.shared_block import attached, create_block, free_block
from hf_softmax.worker_process import WorkerProcess

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_BUILD_THREAD_KNOBS = ("n_jobs", "num_threads", "threads")  # annoy, hnsw, faiss
_POLL_S = 0.2  # how often a waiting trainer thread checks that the worker still lives


def sampler_spec(sampler: Any, build_threads: int | None) -> tuple[type, dict[str, Any]]:
    """The class and constructor arguments that rebuild ``sampler.builder`` (``auto``: its
    chosen backend) in the worker: knobs read back from the attributes of the same name (or
    the one ``knob_attributes`` maps it to), ``build_threads`` for the build-thread knob,
    then the class's ``worker_knobs``."""
    target = sampler.builder
    cls = type(target)
    renamed = getattr(cls, "knob_attributes", {})
    kwargs: dict[str, Any] = {}
    for klass in cls.__mro__:  # subclasses taking (*a, **kw) pass them on to a parent
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        for name, param in params.items():
            if name == "self" or name in kwargs or param.kind in (param.VAR_POSITIONAL,
                                                                   param.VAR_KEYWORD):  # fmt: skip
                continue
            if hasattr(target, renamed.get(name, name)):
                kwargs[name] = getattr(target, renamed.get(name, name))
            elif param.default is param.empty:
                raise TypeError(f"sampler {sampler.name!r}: cannot build in a process: its "
                                f"argument {name!r} is not an attribute")  # fmt: skip
        if not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values()):
            break
    if build_threads is not None:
        kwargs.update({k: int(build_threads) for k in _BUILD_THREAD_KNOBS if k in kwargs})
    kwargs.update(getattr(cls, "worker_knobs", {}))  # faiss: builds on the CPU there
    return cls, kwargs


def serve(conn: Any, cls: type, kwargs: dict[str, Any], threads: int | None) -> None:
    """The worker's loop: one request per rebuild, until None or the connection closes."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    sampler = cls(**kwargs)
    refreshing = refreshes(cls)
    written: list[Path] = []  # this worker's index files, oldest first
    blocks: list[SharedMemory] = []  # the trainer's reused block, kept mapped between builds
    try:
        _serve(conn, sampler, refreshing, written, blocks)
    finally:
        for shm in blocks:
            with contextlib.suppress(BufferError):  # a view left by a failed build
                shm.close()


def _serve(conn: Any, sampler: Any, refreshing: bool, written: list[Path],
           blocks: list[SharedMemory]) -> None:  # fmt: skip
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        kind, shm_name, shape, changed, path, effort = msg
        written = keep_last_files(written) + [Path(path)]
        shm = attached(blocks, shm_name)
        t0 = time.perf_counter()
        try:
            if effort is not None:  # target_recall tuned it in the trainer
                sampler.effort = effort
            weights = np.ndarray(shape, np.float32, buffer=shm.buf)
            index, done = None, "refresh"
            if kind == "refresh" and sampler.has_index:
                index = sampler.refresh(weights, changed)
            if index is None:  # label mode: with its (N, K) int32 table, or that alone
                (index, table), done = sampler.build(weights), "build"
            else:
                table = sampler.build_table(index, weights)
            del weights  # no view may outlive the block
            if refreshing:  # kept: the next refresh starts from it
                sampler.swap(index)
            if sampler.queries_features:
                saved, info = save_index(index, Path(path))
            else:  # label mode: the table alone goes back, never the index
                saved, info = "worker", {}
            if table is not None:
                with open(table_path(path), "wb") as fh:
                    np.save(fh, table, allow_pickle=False)
            info["table"] = table is not None
            conn.send(("ok", done, time.perf_counter() - t0, saved, info))
            index = table = None  # freed now (memory keep: for the next build; release: back)
        except BaseException:  # noqa: BLE001 - reported to the trainer
            conn.send(("error", traceback.format_exc()))


def _stop(proc: Any, conn: Any, tmpdir: str, blocks: list[SharedMemory]) -> None:
    """Stop the worker, free the shared block and remove the temporary directory (close()
    and interpreter exit)."""
    if conn is not None:
        try:
            conn.send(None)
        except (OSError, ValueError):
            pass
    if proc is not None:
        proc.join(timeout=2)  # a build in flight is not waited for
        proc.kill()
    if conn is not None:
        conn.close()
    while blocks:
        free_block(blocks.pop())
    shutil.rmtree(tmpdir, ignore_errors=True)


class BuildWorker:
    """One build worker process for one sampler; ``run`` is called from a trainer thread."""

    def __init__(self, sampler: Any, build_threads: int | None = None,
                 memory: str = "keep") -> None:  # fmt: skip
        self.sampler = sampler
        self.build_threads = build_threads
        self.memory = memory  # "keep" | "release" (``worker_process.memory_env``)
        self.spec = sampler_spec(sampler, build_threads)
        self.tmpdir = tempfile.mkdtemp(prefix="hf_softmax-index-")
        self._proc: Any = None
        self._conn: Any = None
        self._count = 0
        self._blocks: list[SharedMemory] = []  # the reused shared block (one at most)
        self._finalizer = weakref.finalize(self, _stop, None, None, self.tmpdir, self._blocks)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def shared_block(self) -> str | None:
        """The name of the reused shared-memory block (None before the first build)."""
        return self._blocks[0].name if self._blocks else None

    def pid_alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def _ensure(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        if self._conn is not None:
            self._conn.close()
        self._proc = WorkerProcess(self.tmpdir, self.spec, self.build_threads, self.memory)
        self._conn = self._proc.conn
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _stop, self._proc, self._conn, self.tmpdir,
                                           self._blocks)  # fmt: skip
        log.info("index build worker started (pid %d, build threads %s, memory: %s)",
                 self._proc.pid, self.build_threads, self.memory)  # fmt: skip

    def _block(self, nbytes: int) -> SharedMemory:
        """The shared block of ``nbytes``, made on first use and kept (remade when N changes)."""
        if self._blocks and self._blocks[0].size != max(int(nbytes), 1):
            free_block(self._blocks.pop())
        if not self._blocks:
            self._blocks.append(create_block(nbytes))
        return self._blocks[0]

    def build(
        self, kind: str, weights: np.ndarray | torch.Tensor, changed: np.ndarray
    ) -> tuple[Any, str, np.ndarray | None]:
        """weights (N, D), an array or the live rows -> (the index, "build" | "refresh", the
        class-neighbour table or None) built by the worker; blocks."""
        import torch

        self._ensure()
        shape = tuple(weights.shape)
        self._count += 1
        path = Path(self.tmpdir) / f"index-{self._count}"
        shm = self._block(int(np.prod(shape)) * 4)
        view = np.ndarray(shape, np.float32, buffer=shm.buf)
        try:
            # any device or array; torch's copy releases the GIL
            torch.from_numpy(view).copy_(torch.as_tensor(weights).detach())
            del view  # no view may outlive the block
            try:
                self._conn.send((kind, shm.name, shape, np.asarray(changed), str(path),
                                 self.sampler.effort))  # fmt: skip
                reply = self._wait()
            except (OSError, EOFError) as e:  # the pipe broke: the worker is gone
                raise self._died() from e
            if reply[0] == "error":
                raise RuntimeError(f"index build worker (pid {self.pid}) failed:\n{reply[1]}")
            _, done, _seconds, saved, info = reply
            table = None
            if info["table"]:  # mmapped: no copy now; a step reads B x K entries of it
                table = np.load(table_path(path), mmap_mode="r", allow_pickle=False)
            if saved == "worker":
                return WorkerIndex(self.pid, self._count), done, table
            return load_index(saved, path, info, self.sampler.metric), done, table
        except BaseException:  # nothing maps the files: delete them now
            path.unlink(missing_ok=True)
            table_path(path).unlink(missing_ok=True)
            raise

    def _wait(self) -> Any:
        while not self._conn.poll(_POLL_S):
            if not self._proc.is_alive():
                raise self._died()
        return self._conn.recv()

    def _died(self) -> RuntimeError:
        proc, self._proc = self._proc, None
        proc.join(timeout=5)
        return RuntimeError(
            f"index build worker (pid {proc.pid}) died with exit code {proc.exitcode} during a "
            "build (killed or out of memory? its own traceback, if any, is on stderr); the "
            "next rebuild starts a new worker"
        )

    def run(self, job: Any, classifier: Any, changed: np.ndarray) -> None:
        """Fill ``job`` (a ``BuildJob``) from a build of ``classifier``'s current rows."""
        with job.recording():
            job.index, job.kind_done, job.table = self.build(job.kind, classifier.weight, changed)

    def close(self) -> None:
        self._finalizer()
        self._proc = self._conn = None
