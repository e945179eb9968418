"""How an index and its class table travel from the build worker to the trainer (files).

``save_index`` / ``load_index``: exact (the rows, ``np.save``), annoy (its own file, loaded
mmapped: no copy, no parse), faiss (``write_index``; read into memory where the file takes
at most a quarter of the available memory, else its ivf lists mmapped: ``faiss_in_memory``)
and hnsw (hnswlib's file, read whole). ``table_path``: where the
class-neighbour table goes beside the index file. ``WorkerIndex``: what the trainer holds in
label mode, where only the table comes back (``hf_softmax.build_worker``).
``keep_last_files``: the worker deletes the files the trainer no longer maps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# A faiss index is read into memory when its file takes at most this share of the available
# memory. Mmapped, faiss serves an ivf index's lists from ``OnDiskInvertedLists``: at 10^6 x
# 256 (nprobe 1, batches of 256) it searched in 11.5-14.9 ms a batch, warm or cold, against
# 5.0-5.5 ms read into memory (a 1.0 GB file, 0.5-1.9 s in the loading thread, no step
# stalled). At 10^7 x 128 (7.2 GB) the mmap keeps it out of the trainer's memory.
IN_MEMORY_SHARE = 0.25
_faiss_loads: list[bool] = []  # how the last faiss index was loaded (logged when it changes)


def available_bytes() -> int | None:
    """The memory the kernel says is available (/proc/meminfo ``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def faiss_in_memory(file_bytes: int, available: int | None) -> bool:
    """Read a faiss index of ``file_bytes`` into memory (True) or mmap its lists (False):
    in memory when it takes at most ``IN_MEMORY_SHARE`` of ``available`` (unknown: mmap)."""
    return available is not None and file_bytes <= IN_MEMORY_SHARE * available


@dataclass(frozen=True)
class WorkerIndex:
    """Label mode, process builds: the index of build ``build`` lives in worker ``pid``,
    which handed back only its class table; the trainer selects from the table and never
    queries an index."""

    pid: int | None
    build: int


def save_index(index: Any, path: Path) -> tuple[str, dict[str, Any]]:
    """Write ``index`` to ``path``; returns (kind, what ``load_index`` needs besides it)."""
    import torch
    from annoy import AnnoyIndex

    if isinstance(index, torch.Tensor):  # exact: the (normalised) rows
        with open(path, "wb") as fh:  # np.save(name) would append ".npy"
            np.save(fh, index.numpy(), allow_pickle=False)
        return "tensor", {}
    if isinstance(index, AnnoyIndex):
        index.save(str(path))
        return "annoy", {"dim": index.f}
    if type(index).__module__.startswith("faiss"):  # a CPU faiss index
        import faiss

        faiss.write_index(index, str(path))
        return "faiss", {}
    if hasattr(index, "save_index"):  # hnswlib
        index.save_index(str(path))
        return "hnsw", {"space": index.space, "dim": index.dim, "n": index.max_elements}
    raise TypeError(f"build worker: cannot save an index of type {type(index).__name__}")


def load_index(kind: str, path: Path, info: dict[str, Any], metric: str) -> Any:
    """The index ``save_index`` wrote (annoy: mmapped, the file may be unlinked afterwards)."""
    if kind == "tensor":
        import torch

        return torch.from_numpy(np.load(path, allow_pickle=False))
    if kind == "annoy":
        from annoy import AnnoyIndex

        from hf_softmax.samplers.annoy import ANNOY_METRIC

        index = AnnoyIndex(info["dim"], ANNOY_METRIC[metric])
        index.load(str(path))
        return index
    if kind == "faiss":  # in memory, or the ivf lists mmapped (the file may go afterwards)
        import faiss

        size, available = path.stat().st_size, available_bytes()
        in_memory = faiss_in_memory(size, available)
        if _faiss_loads[-1:] != [in_memory]:
            log.info(
                "faiss index file of %.2f GB %s (available memory %s)",
                size / 1e9,
                "read into memory" if in_memory else "mmapped: its lists searched from the file",
                "unknown" if available is None else f"{available / 1e9:.1f} GB",
            )
            _faiss_loads[:] = [in_memory]
        if in_memory:
            return faiss.read_index(str(path))
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    import hnswlib

    index = hnswlib.Index(space=info["space"], dim=info["dim"])
    index.load_index(str(path), max_elements=info["n"])
    return index


def table_path(index_path: str | Path) -> Path:
    """Where the worker writes the class-neighbour table of the index at ``index_path``."""
    return Path(f"{index_path}.table.npy")


def keep_last_files(written: list[Path]) -> list[Path]:
    """The worker, at a new request: delete the index files (and tables) of every build in
    ``written`` (oldest first) but the last, the only one the trainer may still map (a
    request comes after the previous build was swapped in); returns what is kept. Deleting
    there frees their pages in the worker: in the trainer, the munmap of an unlinked file
    freed them inside a step (28 ms at 10^6 classes in label mode)."""
    for old in written[:-1]:
        old.unlink(missing_ok=True)
        table_path(old).unlink(missing_ok=True)
    return written[-1:]
