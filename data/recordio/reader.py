"""``RecordReader``: random access by key and sequential scans over a .rec file.

``RecordReader`` is picklable: it opens its file handle lazily in each process (checked with
``os.getpid()``), so it can be handed to forked or spawned DataLoader workers. Reads by key
slice whole records out of a read-only ``mmap`` of the .rec (no syscall per record); multi-part
or damaged records take a checked ``os.pread`` path that names file, key and offset in errors.
Every header goes through ``frame.parse_head``.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data.recordio.frame import MAGIC_BYTES, HeadError, RecordIOError, aligned, parse_head
from data.recordio.handle import ProcessLocalFile
from data.recordio.idx import KeyIndex, read_idx_file
from data.recordio.image_header import unpack
from data.recordio.labels import gather_labels

log = logging.getLogger("data.recordio")

_READ_AT_HINT = 1 << 14  # first pread size when the record's extent is unknown
_READ_MAX_HINT = 1 << 22  # cap on the first pread when .idx gaps are large


class RecordReader:
    """Random access by key (``read_idx``) and sequential scan (``__iter__``) over a .rec file.

    ``idx_path`` defaults to the .rec path with suffix ``.idx``. A missing or stale .idx (offset
    past EOF, last record not ending at EOF, no record at the last offset) is rebuilt by scanning
    the .rec (keys 0..n-1 in file order, as im2rec and InsightFace number them), with a logged
    warning; the rebuilt index is kept in memory only. ``rebuild_idx=False`` raises instead.
    """

    def __init__(
        self,
        rec_path: str | os.PathLike,
        idx_path: str | os.PathLike | None = None,
        rebuild_idx: bool = True,
    ):
        self.rec_path = Path(rec_path)
        self.idx_path = (
            Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        )
        self._keys_list: list[int] | None = None
        self.size = os.path.getsize(self.rec_path)  # FileNotFoundError for a missing .rec
        self.file = ProcessLocalFile(self.rec_path, self.size)  # opened per process
        self.rebuilt = False
        self._load_index(rebuild_idx)

    # ------------------------------------------------------------------ index
    def _load_index(self, rebuild: bool) -> None:
        if self.idx_path.is_file():
            keys, offsets = read_idx_file(self.idx_path)
            reason = self._stale_reason(offsets)
            if reason is None:
                self._set_index(keys, offsets)
                return
            what = f"{self.idx_path} is stale for {self.rec_path}: {reason}"
        else:
            what = f"{self.idx_path} is missing"
        if not rebuild:
            raise RecordIOError(f"{what} (expected an index matching the .rec; rebuild_idx=False)")
        log.warning("%s; rebuilding the index by scanning %s (kept in memory)", what, self.rec_path)
        offsets = self.scan_offsets()
        self._set_index(np.arange(len(offsets), dtype=np.int64), offsets)
        self.rebuilt = True

    def _stale_reason(self, offsets: np.ndarray) -> str | None:
        if len(offsets) == 0:
            return None if self.size == 0 else "it is empty but the .rec holds data"
        bad = (offsets < 0) | (offsets > self.size - 8)
        if bad.any():
            o = int(offsets[bad.argmax()])
            return f"offset {o} is outside the .rec ({self.size} bytes)"
        last = int(offsets.max())
        try:
            parse_head(os.pread(self._handle(), 8, last), 0, last, self.size)
        except HeadError as e:
            if e.wrong_magic:
                return f"no record at the highest offset {last} (magic missing)"
        end = self._record_end(last)
        if end != self.size:
            return (
                f"the record at the highest offset {last} ends at {end}, the .rec has {self.size}"
            )
        return None

    def _set_index(self, keys: np.ndarray, offsets: np.ndarray) -> None:
        self.index = KeyIndex(keys, offsets, self.size, self.idx_path)
        self.key_array, self.offsets = keys, offsets  # (n,) int64 each, .idx order
        self._keys_list = None

    def position(self, key: int) -> int:
        """Row of ``key`` in ``key_array`` / ``offsets`` (KeyError if absent)."""
        return self.index.position(key)

    def positions(self, keys) -> np.ndarray:
        """Rows of many ``keys`` at once: ``(n,)`` int64 (KeyError naming the first absent key)."""
        return self.index.positions(keys)

    @property
    def keys(self) -> list[int]:
        """Record keys in .idx order."""
        if self._keys_list is None:
            self._keys_list = self.key_array.tolist()
        return self._keys_list

    def __len__(self) -> int:
        return len(self.key_array)

    def __contains__(self, key: int) -> bool:
        try:
            self.position(key)
        except KeyError:
            return False
        return True

    # ------------------------------------------------------------------ handles
    def _handle(self) -> int:
        return self.file.fd()

    def _mmap(self) -> mmap.mmap | None:
        return self.file.mmap()

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_keys_list": None}

    # ------------------------------------------------------------------ reading
    def _err(self, offset: int, expected: str, key: int | None = None) -> RecordIOError:
        where = f"{self.rec_path}: " + (f"key {key} (" if key is not None else "")
        where += f"offset {offset}" + (f", from {self.idx_path})" if key is not None else "")
        return RecordIOError(f"{where}: {expected}")

    def _head(self, buf, rel: int, offset: int, key: int | None = None) -> tuple[int, int]:
        """``parse_head`` of ``buf[rel:]`` (file ``offset``), errors naming file/key/offset."""
        try:
            return parse_head(buf, rel, offset, self.size)
        except HeadError as e:
            what = e.reason
            if e.wrong_magic:
                what = (
                    "does not point at a record: " if key is not None else "wrong magic: "
                ) + what
            raise self._err(offset, what, key) from None

    def _read(self, offset: int, hint: int, key: int | None = None) -> tuple[bytes, int]:
        """``(record, next offset)`` for the record at ``offset``; first pread of ``hint`` bytes."""
        if offset % 4 or offset < 0:
            raise self._err(offset, "offset is not a record boundary (records are 4-aligned)", key)
        fd = self._handle()
        buf = os.pread(fd, max(hint, 8), offset)
        cflag, n = self._head(buf, 0, offset, key)
        end = 8 + n
        if cflag == 0:
            if end > len(buf):
                buf += os.pread(fd, end - len(buf), offset + len(buf))
            return buf[8:end], offset + 8 + aligned(n)
        if cflag != 1:
            raise self._err(offset, f"record starts with cflag {cflag}, expected 0 or 1", key)
        parts = []
        pos = offset
        while True:
            if end > len(buf):
                buf += os.pread(fd, end - len(buf), pos + len(buf))
            parts.append(buf[8:end])
            pos += 8 + aligned(n)
            if cflag == 3:
                return MAGIC_BYTES.join(parts), pos
            buf = os.pread(fd, 8, pos)
            cflag, n = self._head(buf, 0, pos)
            end = 8 + n
            if cflag not in (2, 3):
                raise self._err(
                    pos,
                    f"cflag {cflag} inside the multi-part record started at {offset}, "
                    "expected 2 or 3",
                )

    def _record_end(self, offset: int) -> int:
        """Offset just past the record at ``offset`` (headers only)."""
        fd = self._handle()
        pos = offset
        first = True
        while True:
            cflag, n = self._head(os.pread(fd, 8, pos), 0, pos)
            if first and cflag not in (0, 1) or not first and cflag not in (2, 3):
                raise self._err(pos, f"unexpected cflag {cflag} in record at {offset}")
            pos += 8 + aligned(n)
            if cflag in (0, 3):
                return pos
            first = False

    def read_idx(self, key: int) -> bytes:
        """The whole record stored under ``key`` (multi-part records re-joined)."""
        i = self.position(key)
        offset = int(self.offsets[i])
        # Fast path: a whole (cflag 0) record sliced out of the mmap, no syscall.
        mm = self.file.mmap()
        if mm is not None and not offset % 4:  # offsets were checked to lie in [0, size-8]
            try:
                cflag, n = parse_head(mm, offset, offset, self.size)
            except HeadError:
                cflag = -1
            if cflag == 0:
                return mm[offset + 8 : offset + 8 + n]
        # Everything else (multi-part, damaged) with full checks and errors.
        hint = min(int(self.index.extents[i]), _READ_MAX_HINT)
        return self._read(offset, hint, key)[0]

    def read_at(self, offset: int) -> tuple[bytes, int]:
        """``(record, next offset)`` of the record at byte ``offset``."""
        return self._read(offset, min(_READ_AT_HINT, max(self.size - offset, 8)))

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """Sequential scan of the whole .rec: ``(offset, record)`` in file order."""
        mm = self._mmap()
        size = self.size
        pos = 0
        while pos < size:
            try:
                cflag, n = parse_head(mm, pos, pos, size)
            except HeadError:
                cflag = -1
            if cflag == 0:
                yield pos, mm[pos + 8 : pos + 8 + n]
                pos += 8 + aligned(n)
                continue
            rec, nxt = self._read(pos, 8)  # multi-part record, or raises the precise error
            yield pos, rec
            pos = nxt

    def scan_offsets(self) -> np.ndarray:
        """``(n,)`` int64 offsets of every record, by walking the headers (no payload reads)."""
        mm = self._mmap()
        offsets = []
        pos, size = 0, self.size
        first = True
        while pos < size:
            cflag, n = self._head(mm, pos, pos)
            if first:
                if cflag not in (0, 1):
                    raise self._err(pos, f"record starts with cflag {cflag}, expected 0 or 1")
                offsets.append(pos)
            elif cflag not in (2, 3):
                raise self._err(pos, f"cflag {cflag} inside a multi-part record, expected 2 or 3")
            first = cflag in (0, 3)
            pos += 8 + aligned(n)
        if not first:
            raise self._err(offsets[-1], "multi-part record has no last part (cflag 3)")
        return np.asarray(offsets, dtype=np.int64)

    def read_labels(self, positions: np.ndarray, width: int = 2) -> tuple[np.ndarray, np.ndarray]:
        """Header-only read of records at rows ``positions`` (not keys) of the index.

        Returns ``flag`` (n,) int64 and ``labels`` (n, width) float32: column 0 is the header
        label when flag == 0, else the first ``min(flag, width)`` float32 labels (NaN beyond).
        See ``labels.gather_labels``.
        """
        positions = np.asarray(positions, dtype=np.int64)
        mm = self._mmap() if len(positions) else None
        if mm is None and len(positions):
            raise self._err(0, "empty .rec file, expected records")

        def full_header(row: int):
            return unpack(self.read_idx(int(self.key_array[row])))[0]

        return gather_labels(mm, self.offsets, self.size, positions, width, full_header)
