"""WorkerProcess: the build worker as a child ``python -m hf_softmax.worker_process``.

Not ``multiprocessing``'s spawn: a spawned child imports the parent's main module again
before it runs anything, so a main script without an ``if __name__ == "__main__":`` guard
starts over in the child (and fails), and even a guarded ``train.py`` costs the worker its
imports (Lightning, Hydra, wandb: 6.8 s to the first build and 363 MiB resident, against
2.6 s and 221 MiB for this child, ``python -m bench.worker_start``). This child imports only
numpy, the sampler's module and what that needs.

The handshake: the child listens on a Unix socket in the worker's private temporary
directory (on Linux an abstract address where that path is too long for a socket;
``multiprocessing.connection.Listener``, an authentication key it reads from its stdin);
the parent connects (``Client``) once the socket is there, then sends its ``sys.path`` (so
the sampler's class unpickles wherever the parent could import it) and the spec (class,
constructor arguments, threads). From then on the connection carries
``build_worker.serve``'s requests and replies. A child whose parent is gone (killed before
it connected, or during a build) exits within a second; it ignores Ctrl-C (its trainer
stops it). Its environment (``memory_env``) keeps what one build frees for the next.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 300.0  # to the child's socket (a loaded machine imports torch slowly)
_WATCH_S = 1.0  # how often the child checks that its parent lives
_MAX_SOCKET_PATH = 100  # bytes (sun_path holds 108 on Linux, 104 on macOS)
_NEVER_TRIM = 1 << 40  # bytes: a heap top glibc never reaches, so it never trims


class WorkerProcess:
    """A started worker child and the connection to it; the ``multiprocessing.Process``
    calls ``BuildWorker`` uses (``pid``, ``exitcode``, ``is_alive``, ``join``, ``kill``)."""

    def __init__(self, folder: str, spec: tuple[type, dict[str, Any]], threads: int | None,
                 memory: str = "keep") -> None:  # fmt: skip
        address = socket_address(folder)
        key = os.urandom(32)
        arg = address.replace("\0", "@", 1)  # argv cannot hold the NUL byte
        cmd = [sys.executable, "-m", "hf_softmax.worker_process", arg, str(os.getpid())]
        self._popen = subprocess.Popen(cmd, stdin=subprocess.PIPE, env=memory_env(memory))
        try:
            self._popen.stdin.write(key.hex().encode() + b"\n")
            self._popen.stdin.close()
            self.conn = self._connect(address, key)
            self.conn.send(list(sys.path))
            self.conn.send((*spec, threads))
        except BaseException:
            self.kill()
            raise

    def _connect(self, address: str, key: bytes) -> Any:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._popen.poll() is not None:
                raise RuntimeError(f"index build worker (pid {self.pid}) exited with code "
                                   f"{self.exitcode} before it started (its traceback, if "
                                   "any, is on stderr)")  # fmt: skip
            try:
                return Client(address, "AF_UNIX", authkey=key)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    msg = f"did not listen on {address} within {START_TIMEOUT_S:.0f} s"
                    raise RuntimeError(f"index build worker (pid {self.pid}) {msg}") from None
                time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        if self.is_alive():
            self._popen.kill()
        self.join(5)


def socket_address(folder: str) -> str:
    """A fresh Unix socket path in ``folder``; on Linux an abstract address (no file: the
    key guards it) where the path would pass the 108-byte limit (a long ``TMPDIR``)."""
    name = f"w-{os.urandom(6).hex()}.sock"
    path = str(Path(folder) / name)
    if len(path.encode()) > _MAX_SOCKET_PATH and sys.platform.startswith("linux"):
        return "\0hf_softmax-" + name
    return path


def memory_env(memory: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The worker's environment: ``environ``, and with ``memory="keep"`` glibc's allocator
    told to keep what a build frees for the next build: no allocation by ``mmap`` (each
    would be unmapped when freed) and no trimming of the heap (variables the user set win).
    A rebuild then reuses pages the first build faulted in. Fresh pages are what a VM's host
    backs on first touch, taking both vCPUs meanwhile: on this 2-vCPU VM, a 2 GiB
    allocation right after another was freed took 40-70 ms of steal per training step for
    ~0.3 s and stretched those steps 2-3x, where rewriting a kept 2 GiB buffer took none
    (docs/bench/selection_notes.md). The worker's resident memory stays at its largest build
    between builds. ``release``: the default allocator (memory back after each build)."""
    env = dict(environ)
    if memory == "keep":
        env.setdefault("MALLOC_MMAP_MAX_", "0")
        env.setdefault("MALLOC_TRIM_THRESHOLD_", str(_NEVER_TRIM))
    return env


def _exit_with(parent: int) -> None:
    """The child's watchdog: exit once ``parent`` is gone (the child is re-parented)."""
    while os.getppid() == parent:
        time.sleep(_WATCH_S)
    os._exit(0)


def main(argv: list[str]) -> None:
    """The child: ``python -m hf_softmax.worker_process ADDRESS PARENT_PID`` (key on stdin)."""
    address, parent = argv[0], int(argv[1])
    if address.startswith("@"):  # abstract (argv cannot hold the NUL byte)
        address = "\0" + address[1:]
    # Ctrl-C reaches the whole process group: the trainer stops this worker (or dies, and the
    # watchdog ends it); a KeyboardInterrupt here would only print a second traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    key = bytes.fromhex(sys.stdin.readline().strip())
    with Listener(address, "AF_UNIX", authkey=key) as listener:
        conn = listener.accept()  # closing the listener removes its socket file
    sys.path[:] = conn.recv()
    cls, kwargs, threads = conn.recv()
    from hf_softmax.build_worker import serve

    serve(conn, cls, kwargs, threads)


if __name__ == "__main__":
    main(sys.argv[1:])
