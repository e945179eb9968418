"""Hand big memory back to the kernel with the GIL released, before the object that holds it
goes.

Freeing memory is slow at this size, and Python frees under the GIL: a thread that drops a
10^6 x 256 float32 snapshot (1 GB) unmaps it for ~55 ms in ``free``, and the training
thread waits for the GIL all that time; dropping an annoy index served from a mapped file
tears down one page-table entry per 4 KB page (50-78 ms at 10^6 x 256). ``madvise`` with
``MADV_DONTNEED`` does that work first, called through ctypes (which releases the GIL): the
free or unmap that follows has nothing left to tear down (0.1 ms). Afterwards the memory
reads as zeros (anonymous) or as the file's data again (a shared file mapping), so only
memory about to be freed, or a file mapping whose data stays in the file, is released.
Linux only; elsewhere every call is a no-op that returns 0.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from pathlib import Path
from typing import Any

import numpy as np

_MADV_DONTNEED = 4  # Linux
_MIN_BYTES = 1 << 20  # below this a free is cheap: not worth a system call
_MADVISE: Any = None


def _madvise() -> Any:
    global _MADVISE
    if _MADVISE is None:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _MADVISE = madvise
    return _MADVISE


def release_range(start: int, nbytes: int) -> int:
    """Drop the whole pages inside [start, start + nbytes) from this process; returns the
    bytes dropped (0: too small, not Linux, or refused)."""
    if not sys.platform.startswith("linux") or nbytes < _MIN_BYTES:
        return 0
    page = mmap.PAGESIZE
    first = -(-start // page) * page
    last = (start + nbytes) // page * page
    if last <= first or _madvise()(first, last - first, _MADV_DONTNEED) != 0:
        return 0
    return last - first


def release_array(array: np.ndarray) -> int:
    """Drop the pages of ``array``'s buffer, which nothing may read again: its owner is about
    to free it (they read as zeros until then). Returns the bytes dropped."""
    if not array.flags.c_contiguous:
        return 0
    return release_range(array.ctypes.data, array.nbytes)


def release_file_mappings(path: str | Path) -> int:
    """Drop this process's page-table entries over every mapping of the file ``path``; the
    file keeps its data and a later read faults the pages back in. Returns the bytes
    dropped (0 where /proc/self/maps is not there)."""
    try:
        with open("/proc/self/maps") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return 0
    done, name = 0, str(path)
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == name:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            done += release_range(start, end - start)
    return done
