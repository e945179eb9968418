"""The shared-memory block a trainer copies its rows into for the build worker.

The trainer creates one block (``create_block``: a clear error where /dev/shm is too small)
and reuses it for every build while N x D stays the same (``free_block`` at the end); the
worker maps it once (``attach_block``, untracked: see there) and keeps it mapped while the
trainer sends the same name (``attached``).
"""

from __future__ import annotations

import os
import shutil
import sys
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory


def create_block(nbytes: int) -> SharedMemory:
    """A shared-memory block of ``nbytes``; a clear error where /dev/shm is too small (a
    write past its size would kill the process with SIGBUS)."""
    if os.path.isdir("/dev/shm"):
        free = shutil.disk_usage("/dev/shm").free
        if free < nbytes:
            raise RuntimeError(
                f"build worker: /dev/shm has {free / 2**30:.2f} GiB free, the snapshot needs "
                f"{nbytes / 2**30:.2f} GiB (docker: --shm-size)"
            )
    return SharedMemory(create=True, size=max(int(nbytes), 1))


def free_block(shm: SharedMemory) -> None:
    shm.close()
    shm.unlink()


def attach_block(name: str) -> SharedMemory:
    """The parent's shared block ``name``, opened in the child without tracking it: the
    child's own resource tracker would unlink the parent's block when the child exits
    (CPython gh-82300; Python 3.13 has ``track=False``, earlier ones unregister it)."""
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, track=False)
    shm = SharedMemory(name=name)
    resource_tracker.unregister("/" + shm.name, "shared_memory")  # POSIX names: "/" + name
    return shm


def attached(blocks: list[SharedMemory], name: str) -> SharedMemory:
    """The worker's mapping of block ``name`` (``blocks``: at most the one it holds), made once
    and kept while the trainer reuses the block: a fresh mapping per build faulted every page
    in again (262,144 at 10^6 x 256); another name closes the old mapping first."""
    if blocks and blocks[0].name != name.lstrip("/"):
        blocks.pop().close()
    if not blocks:
        blocks.append(attach_block(name))
    return blocks[0]
