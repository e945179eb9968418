"""BuildFiles: the files an annoy build writes its nodes into, instead of process memory.

Built in memory, Annoy sizes its node buffer at the first ``add_item`` with one ``realloc``
and a ``memset`` of the whole buffer, under the GIL: at 10^6 x 256 a training step in the
main thread waited 3.4 s for it (``bench/build_stall``, a build thread). Built on disk
(``AnnoyIndex.on_disk_build``) the buffer is a sparse file grown by ``ftruncate``: its pages
fault in a node at a time as the rows are added, between the build's GIL hand-overs, and the
built index serves from the mapped file.

Where (``AnnoySampler.build_dir``): a directory given; else ``/dev/shm`` (RAM, no disk
writes), else the temporary directory, each only while it has twice the index's estimated
size free (a mapped file that cannot grow kills the process with SIGBUS); else, or with
``memory``, in memory as before (logged once). Each build gets a new file. At the next build
(in the build's thread) the files of all earlier builds but the serving one's are deleted:
their pages are freed there, not in the step that drops the old index. An index taken out
of service is dropped in a thread of its own (``retire``), after its mapping's page-table
entries are dropped there with the GIL released (``page_release.release_file_mappings``):
unmapping a file mapping with every page mapped tears down one entry per 4 KB page, 50-78
ms at 10^6 x 256, under the GIL inside the step that swapped. The directory goes with the
sampler (or at exit); one left by a process that was killed (its pid in the name) is
deleted when the next process makes its own there.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

from hf_softmax.page_release import release_file_mappings

log = logging.getLogger(__name__)

MEMORY = "memory"  # build_dir value: build in process memory
PREFIX = "hf_softmax-annoy-"  # + "<pid>-<random>": a process's build directory


def annoy_bytes(n: int, dim: int, ntrees: int) -> int:
    """A generous estimate of an annoy file: n item nodes of ~4 * (dim + 4) bytes plus the
    trees' split nodes (10 trees over 10^6 x 256: 1.17 GB for 1.04 GB of items)."""
    return int(n * 4 * (dim + 4) * (1.0 + 0.05 * max(ntrees, 1)))


class BuildFiles:
    """Hands out one build file per annoy build and deletes the ones no index serves from."""

    def __init__(self, where: str | None = None) -> None:
        self.where = where
        self._dir: Path | None = None
        self._files: list[tuple[int, Path]] = []  # (id of the index built there, file)
        self._count = 0
        self._warned = False

    def next_path(self, nbytes: int, serving: Any) -> str | None:
        """A fresh file for a build of ``nbytes`` (None: build in memory). Deletes the files
        of earlier builds except ``serving``'s (the index queries use now)."""
        self._files = [f for f in self._files if f[0] == id(serving)][-1:]
        kept = {path for _, path in self._files}
        if self._dir is not None:  # also the file of a build that failed
            for path in self._dir.glob("build-*.ann"):
                if path not in kept:
                    path.unlink(missing_ok=True)
        folder = self._folder(nbytes)
        if folder is None:
            return None
        self._count += 1
        return str(folder / f"build-{self._count}.ann")

    def built(self, index: Any, path: str | None) -> None:
        """Record that ``index`` serves from ``path`` (its file is kept while it serves)."""
        if path is not None:
            self._files.append((id(index), Path(path)))

    def retire(self, index: Any) -> threading.Thread | None:
        """Drop ``index``, just taken out of service, in a thread of its own: first its file
        mapping's page-table entries (GIL released), then the object, whose unmap is then
        cheap. The caller must hold no other reference. None (nothing started) for an index
        built in memory."""
        paths = [path for key, path in self._files if key == id(index)]
        if not paths:
            return None
        holder = [index]
        del index  # the thread's holder is the last reference

        def drop() -> None:
            release_file_mappings(paths[-1])
            holder.clear()  # annoy unloads here, not in the step that swapped

        thread = threading.Thread(target=drop, name="annoy-retire", daemon=True)
        thread.start()
        return thread

    def _folder(self, nbytes: int) -> Path | None:
        if self.where == MEMORY:
            return None
        if self._dir is not None and _room(self._dir, nbytes):
            return self._dir
        candidates = [self.where] if self.where else ["/dev/shm", tempfile.gettempdir()]
        for base in candidates:
            if base and os.path.isdir(base) and _room(Path(base), nbytes):
                _sweep_dead(Path(base))
                prefix = f"{PREFIX}{os.getpid()}-"
                self._dir = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
                weakref.finalize(self, shutil.rmtree, str(self._dir), True)
                return self._dir
        if not self._warned:
            self._warned = True
            log.warning("annoy: no room for a %.2f GB build file (twice that free) in %s: "
                        "building in memory, where sizing the nodes holds the GIL",
                        nbytes / 2**30, candidates)  # fmt: skip
        return None


def _room(folder: Path, nbytes: int) -> bool:
    return shutil.disk_usage(folder).free >= 2 * nbytes


def _sweep_dead(base: Path) -> None:
    """Delete the build directories under ``base`` of processes no longer running (killed
    before their exit could: in /dev/shm their files would hold RAM until a reboot)."""
    for folder in base.glob(f"{PREFIX}*-*"):
        pid = folder.name[len(PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
