"""A read-only file handle (and ``mmap``) that each process opens for itself.

Pickled (spawned DataLoader workers) it travels without the handle; inherited through fork it
is noticed and reopened, so readers built in the main process are safe in workers.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

# Bumped in every forked child, so that the per-read check that this process opened the handle
# is a global lookup instead of an os.getpid() system call (the pid is still checked on open).
_FORK_GENERATION = 0


def _after_fork_in_child() -> None:
    global _FORK_GENERATION
    _FORK_GENERATION += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class ProcessLocalFile:
    """``fd()`` and ``mmap()`` of ``path`` (``size`` bytes) opened lazily by this process.

    ``pid``: the process that opened the current handle (None while closed).
    """

    def __init__(self, path: Path, size: int):
        self.path = path
        self.size = size
        self._fd: int | None = None
        self._mm: mmap.mmap | None = None
        self.pid: int | None = None  # process that opened _fd
        self._gen = -1

    def fd(self) -> int:
        pid = os.getpid()
        if self._fd is None or self.pid != pid:
            if self._fd is not None:  # inherited through fork: this process opens its own
                try:
                    os.close(self._fd)
                except OSError:
                    pass
            self._mm = None
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self.pid = pid
        self._gen = _FORK_GENERATION
        return self._fd

    def mmap(self) -> mmap.mmap | None:
        """The whole file mapped read-only (None for an empty file)."""
        mm = self._mm
        if mm is not None and self._gen == _FORK_GENERATION:
            return mm  # the common case: one global lookup, no system call
        fd = self.fd()
        if self._mm is None and self.size > 0:
            self._mm = mmap.mmap(fd, self.size, access=mmap.ACCESS_READ)
        return self._mm

    def close(self) -> None:
        if self._mm is not None and self.pid == os.getpid():
            try:
                self._mm.close()
            except BufferError:  # a numpy view is still alive; let GC close it
                pass
        self._mm = None
        if self._fd is not None and self.pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __getstate__(self) -> dict:
        return {"path": self.path, "size": self.size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["size"])
