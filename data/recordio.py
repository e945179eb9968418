"""Native MXNet RecordIO: records, the ``IfQQ`` image header and ``.idx`` files, without mxnet.

A record on disk (dmlc-core ``recordio.h``), all little-endian::

    u32 magic 0xCED7230A | u32 lrec = cflag << 29 | length | data (length bytes) | zero pad to 4

``cflag`` 0 is a whole record. When the data holds the magic at a 4-aligned offset, MXNet's
writer splits the record there, drops that magic and writes parts with cflag 1 (first),
2 (middle), 3 (last); the reader puts the magic back between the parts. ``.idx`` files hold
``key<TAB>byte offset`` lines. Image records start with the 24-byte header ``IfQQ``
(flag, label, id, id2); when flag > 0, ``flag`` float32 labels follow it.

``RecordReader`` is picklable: it opens its file handle lazily in each process (checked with
``os.getpid()``), so it can be handed to forked or spawned DataLoader workers. Reads by key
slice whole records out of a read-only ``mmap`` of the .rec (no syscall per record); multi-part
or damaged records take a checked ``os.pread`` path that names file, key and offset in errors.
"""

from __future__ import annotations

import logging
import mmap
import numbers
import os
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
IR_FORMAT = "<IfQQ"
IR_SIZE = 24
MAX_LENGTH = (1 << 29) - 1  # lrec keeps the length in its low 29 bits

_HEAD = struct.Struct("<II")
_IR = struct.Struct(IR_FORMAT)
_READ_AT_HINT = 1 << 14  # first pread size when the record's extent is unknown
_READ_MAX_HINT = 1 << 22  # cap on the first pread when .idx gaps are large


# Bumped in every forked child, so that the per-read check that this process opened the handle
# is a global lookup instead of an os.getpid() system call (the pid is still checked on open).
_FORK_GENERATION = 0


def _after_fork_in_child() -> None:
    global _FORK_GENERATION
    _FORK_GENERATION += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class RecordIOError(ValueError):
    """A RecordIO / .idx file is not what it should be (message: file, key/offset, expected)."""


@dataclass(frozen=True, eq=False)
class IRHeader:
    """The 24-byte image record header. ``label`` is a float (flag 0) or ``(flag,)`` float32."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack(header: IRHeader, payload: bytes) -> bytes:
    """Header + payload, exactly as ``mxnet.recordio.pack``.

    A scalar label is stored in the header with flag 0; an array label stores flag = its size,
    header label 0 and the float32 labels before the payload (``header.flag`` is ignored).
    """
    label = header.label
    if isinstance(label, numbers.Number):
        return _IR.pack(0, label, header.id, header.id2) + bytes(payload)
    arr = np.asarray(label, dtype=np.float32)
    return _IR.pack(arr.size, 0.0, header.id, header.id2) + arr.tobytes() + bytes(payload)


def unpack(record: bytes) -> tuple[IRHeader, bytes]:
    """``(header, payload)`` from a record, exactly as ``mxnet.recordio.unpack``."""
    if len(record) < IR_SIZE:
        raise RecordIOError(
            f"record of {len(record)} bytes is shorter than the {IR_SIZE}-byte IfQQ header"
        )
    flag, label, id_, id2 = _IR.unpack_from(record)
    if flag > 0:
        end = IR_SIZE + 4 * flag
        if len(record) < end:
            raise RecordIOError(
                f"record header says {flag} float32 labels ({end} bytes with the header), "
                f"but the record has {len(record)} bytes"
            )
        labels = np.frombuffer(record, np.float32, flag, IR_SIZE)
        return IRHeader(flag, labels, id_, id2), bytes(record[end:])
    return IRHeader(flag, label, id_, id2), bytes(record[IR_SIZE:])


def _aligned(n: int) -> int:
    return (n + 3) & ~3


def split_parts(data: bytes) -> list[tuple[int, int, int]]:
    """``(cflag, start, end)`` parts as dmlc-core's ``RecordIOWriter::WriteRecord`` splits.

    Every occurrence of the magic at a 4-aligned offset ends a part and is dropped.
    """
    start = 0
    parts: list[tuple[int, int, int]] = []
    i = data.find(MAGIC_BYTES)
    while i >= 0:
        if i % 4 == 0:
            parts.append((2 if parts else 1, start, i))
            start = i + 4
            i = data.find(MAGIC_BYTES, start)
        else:
            i = data.find(MAGIC_BYTES, i + 1)
    parts.append((3 if parts else 0, start, len(data)))
    return parts


def encode_record(data: bytes) -> bytes:
    """The on-disk bytes of one record (header(s), parts, zero padding)."""
    n = len(data)
    if n > MAX_LENGTH:
        raise RecordIOError(f"record of {n} bytes is too long (RecordIO allows < 2^29 bytes)")
    pad = b"\0" * (_aligned(n) - n)
    if MAGIC_BYTES not in data:
        return _HEAD.pack(MAGIC, n) + bytes(data) + pad
    out = []
    for cflag, a, b in split_parts(data):
        out.append(_HEAD.pack(MAGIC, cflag << 29 | (b - a)))
        out.append(bytes(data[a:b]))
    out.append(pad)
    return b"".join(out)


class RecordWriter:
    """Writes a .rec (and optionally its .idx) byte-identical to ``mx.recordio.MXIndexedRecordIO``.

    ``with RecordWriter("train.rec", "train.idx") as w: w.write_idx(key, pack(header, img))``
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else None
        self._rec = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w", newline="\n") if self.idx_path else None
        self._pos = 0

    def tell(self) -> int:
        return self._pos

    def write(self, data: bytes) -> int:
        """Append one record; returns its byte offset."""
        offset = self._pos
        raw = encode_record(data)
        self._rec.write(raw)
        self._pos += len(raw)
        return offset

    def write_idx(self, key: int, data: bytes) -> int:
        """Append one record and its ``key<TAB>offset`` line; returns the offset."""
        if self._idx is None:
            raise RecordIOError(f"{self.rec_path}: write_idx needs a RecordWriter with idx_path")
        offset = self.write(data)
        self._idx.write(f"{key}\t{offset}\n")
        return offset

    def close(self) -> None:
        self._rec.close()
        if self._idx is not None:
            self._idx.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_idx_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, offsets)``, both ``(n,)`` int64, from ``key<TAB>offset`` lines (fast at 5M)."""
    path = Path(path)
    raw = path.read_bytes().rstrip()
    if not raw:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # Fast path: separators must alternate tab, newline and every field must be an integer.
    buf = np.frombuffer(raw, np.uint8)
    seps = buf[(buf == 9) | (buf == 10)]
    ok = len(seps) % 2 == 1 and (seps[0::2] == 9).all() and (seps[1::2] == 10).all()
    if ok:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                fields = np.fromstring(raw, dtype=np.int64, sep=" ")
            except (ValueError, DeprecationWarning):
                fields = None
        info = np.iinfo(np.int64)  # numpy saturates out-of-range values: check them slowly
        if (
            fields is not None
            and len(fields) == len(seps) + 1
            and not ((fields == info.max) | (fields == info.min)).any()
        ):
            return fields[0::2].copy(), fields[1::2].copy()
    # Slow path only to name the bad line.
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        parts = line.strip(b"\r").split(b"\t")
        if len(parts) != 2:
            raise RecordIOError(f"{path}: line {lineno}: expected 'key<TAB>offset', got {line!r}")
        try:
            values = int(parts[0]), int(parts[1])
        except ValueError:
            raise RecordIOError(
                f"{path}: line {lineno}: expected integer key and offset, got {line!r}"
            ) from None
        if not all(-(2**63) < v < 2**63 - 1 for v in values):
            raise RecordIOError(
                f"{path}: line {lineno}: expected 64-bit key and offset, got {line!r}"
            )
    raise RecordIOError(f"{path}: could not parse as 'key<TAB>offset' lines")


def write_idx_file(path: str | os.PathLike, keys, offsets) -> None:
    """Write ``key<TAB>offset`` lines (the format MXIndexedRecordIO writes)."""
    with open(path, "w", newline="\n") as f:
        f.writelines(f"{k}\t{o}\n" for k, o in zip(np.asarray(keys).tolist(), offsets, strict=True))


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
        self._fd: int | None = None
        self._mm: mmap.mmap | None = None
        self._pid: int | None = None
        self._gen = -1
        self._keys_list: list[int] | None = None
        self.size = os.path.getsize(self.rec_path)  # FileNotFoundError for a missing .rec
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
        head = os.pread(self._handle(), 8, last)
        if _HEAD.unpack(head)[0] != MAGIC:
            return f"no record at the highest offset {last} (magic missing)"
        end = self._record_end(last)
        if end != self.size:
            return (
                f"the record at the highest offset {last} ends at {end}, the .rec has {self.size}"
            )
        return None

    def _set_index(self, keys: np.ndarray, offsets: np.ndarray) -> None:
        self.key_array = keys
        self.offsets = offsets
        # Extent of each record = distance to the next indexed offset (EOF for the last):
        # the checked pread path (multi-part, damaged records) then needs one read.
        order = np.argsort(offsets, kind="stable")
        srt = offsets[order]
        ext = np.empty_like(offsets)
        ext[order] = _next_distinct(srt, self.size) - srt
        self._extents = ext
        n = len(keys)
        if n and keys[0] >= 0 and (keys == np.arange(keys[0], keys[0] + n)).all():
            self._key_base: int | None = int(keys[0])
            self._key_pos: dict[int, int] | None = None
        else:
            self._key_base = None
            self._key_pos = {k: i for i, k in enumerate(keys.tolist())}
        self._keys_list = None

    @property
    def keys(self) -> list[int]:
        """Record keys in .idx order."""
        if self._keys_list is None:
            self._keys_list = self.key_array.tolist()
        return self._keys_list

    def position(self, key: int) -> int:
        """Row of ``key`` in ``key_array`` / ``offsets`` (KeyError if absent)."""
        if self._key_base is not None:
            i = key - self._key_base
            if 0 <= i < len(self.key_array):
                return int(i)
        elif key in self._key_pos:
            return self._key_pos[key]
        raise KeyError(f"{self.idx_path}: no key {key}")

    def positions(self, keys) -> np.ndarray:
        """Rows of many ``keys`` at once: ``(n,)`` int64 (KeyError naming the first absent key)."""
        keys = np.asarray(keys, dtype=np.int64)
        if self._key_base is not None:
            pos = keys - self._key_base
            bad = (pos < 0) | (pos >= len(self.key_array))
            if bad.any():
                raise KeyError(f"{self.idx_path}: no key {int(keys[bad.argmax()])}")
            return pos
        return np.fromiter((self.position(k) for k in keys.tolist()), np.int64, len(keys))

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
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            if self._fd is not None:  # inherited through fork: this process opens its own
                try:
                    os.close(self._fd)
                except OSError:
                    pass
            self._mm = None
            self._fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self._pid = pid
        self._gen = _FORK_GENERATION
        return self._fd

    def _mmap(self) -> mmap.mmap | None:
        fd = self._handle()
        if self._mm is None and self.size > 0:
            self._mm = mmap.mmap(fd, self.size, access=mmap.ACCESS_READ)
        return self._mm

    def close(self) -> None:
        if self._mm is not None and self._pid == os.getpid():
            try:
                self._mm.close()
            except BufferError:  # a numpy view is still alive; let GC close it
                pass
        self._mm = None
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_fd=None, _mm=None, _pid=None, _gen=-1, _keys_list=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------------------ reading
    def _err(self, offset: int, expected: str, key: int | None = None) -> RecordIOError:
        where = f"{self.rec_path}: " + (f"key {key} (" if key is not None else "")
        where += f"offset {offset}" + (f", from {self.idx_path})" if key is not None else "")
        return RecordIOError(f"{where}: {expected}")

    def _header(self, buf: bytes, rel: int, offset: int, key: int | None) -> tuple[int, int]:
        """``(cflag, length)`` of the header at ``buf[rel:]`` (file offset ``offset``), checked."""
        if len(buf) - rel < 8 or offset + 8 > self.size:
            raise self._err(offset, f"truncated record header (file ends at {self.size})", key)
        magic, lrec = _HEAD.unpack_from(buf, rel)
        if magic != MAGIC:
            what = "does not point at a record" if key is not None else "wrong magic"
            raise self._err(
                offset, f"{what}: expected magic 0x{MAGIC:08x}, found 0x{magic:08x}", key
            )
        n = lrec & MAX_LENGTH
        if offset + 8 + _aligned(n) > self.size:
            raise self._err(
                offset,
                f"truncated record: length {n} (+8 header, padded) runs past the end of the file "
                f"({self.size} bytes)",
                key,
            )
        return lrec >> 29, n

    def _read(self, offset: int, hint: int, key: int | None = None) -> tuple[bytes, int]:
        """``(record, next offset)`` for the record at ``offset``; first pread of ``hint`` bytes."""
        if offset % 4 or offset < 0:
            raise self._err(offset, "offset is not a record boundary (records are 4-aligned)", key)
        fd = self._handle()
        buf = os.pread(fd, max(hint, 8), offset)
        cflag, n = self._header(buf, 0, offset, key)
        end = 8 + n
        if cflag == 0:
            if end > len(buf):
                buf += os.pread(fd, end - len(buf), offset + len(buf))
            return buf[8:end], offset + 8 + _aligned(n)
        if cflag != 1:
            raise self._err(offset, f"record starts with cflag {cflag}, expected 0 or 1", key)
        parts = []
        pos = offset
        while True:
            if end > len(buf):
                buf += os.pread(fd, end - len(buf), pos + len(buf))
            parts.append(buf[8:end])
            pos += 8 + _aligned(n)
            if cflag == 3:
                return MAGIC_BYTES.join(parts), pos
            buf = os.pread(fd, 8, pos)
            cflag, n = self._header(buf, 0, pos, None)
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
            cflag, n = self._header(os.pread(fd, 8, pos), 0, pos, None)
            if first and cflag not in (0, 1) or not first and cflag not in (2, 3):
                raise self._err(pos, f"unexpected cflag {cflag} in record at {offset}")
            pos += 8 + _aligned(n)
            if cflag in (0, 3):
                return pos
            first = False

    def read_idx(self, key: int) -> bytes:
        """The whole record stored under ``key`` (multi-part records re-joined)."""
        i = self.position(key)
        offset = int(self.offsets[i])
        # Fast path: a whole (cflag 0) record sliced out of the mmap, no syscall.
        mm = self._mm
        if mm is None or self._gen != _FORK_GENERATION:
            mm = self._mmap()
        if mm is not None and not offset % 4:  # offsets were checked to lie in [0, size-8]
            magic, lrec = _HEAD.unpack_from(mm, offset)
            if magic == MAGIC and lrec < 1 << 29:
                end = offset + 8 + lrec
                if end + (-lrec & 3) <= self.size:
                    return mm[offset + 8 : end]
        # Everything else (multi-part, damaged) with full checks and errors.
        hint = min(int(self._extents[i]), _READ_MAX_HINT)
        return self._read(offset, hint, key)[0]

    def read_at(self, offset: int) -> tuple[bytes, int]:
        """``(record, next offset)`` of the record at byte ``offset``."""
        return self._read(offset, min(_READ_AT_HINT, max(self.size - offset, 8)))

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """Sequential scan of the whole .rec: ``(offset, record)`` in file order."""
        mm = self._mmap()
        size = self.size
        pos = 0
        unpack_from = _HEAD.unpack_from
        while pos < size:
            if pos + 8 <= size:
                magic, lrec = unpack_from(mm, pos)
                if magic == MAGIC and lrec < 1 << 29:
                    nxt = pos + 8 + lrec + (-lrec & 3)
                    if nxt <= size:
                        yield pos, mm[pos + 8 : pos + 8 + lrec]
                        pos = nxt
                        continue
            rec, nxt = self._read(pos, 8)  # multi-part record, or raises the precise error
            yield pos, rec
            pos = nxt

    def scan_offsets(self) -> np.ndarray:
        """``(n,)`` int64 offsets of every record, by walking the headers (no payload reads)."""
        mm = self._mmap()
        offsets = []
        pos, size = 0, self.size
        unpack_from = _HEAD.unpack_from
        first = True
        while pos < size:
            if pos + 8 > size:
                raise self._err(pos, f"truncated record header (file ends at {size})")
            magic, lrec = unpack_from(mm, pos)
            if magic != MAGIC:
                raise self._err(pos, f"wrong magic: expected 0x{MAGIC:08x}, found 0x{magic:08x}")
            cflag = lrec >> 29
            if first:
                if cflag not in (0, 1):
                    raise self._err(pos, f"record starts with cflag {cflag}, expected 0 or 1")
                offsets.append(pos)
            elif cflag not in (2, 3):
                raise self._err(pos, f"cflag {cflag} inside a multi-part record, expected 2 or 3")
            first = cflag in (0, 3)
            pos += 8 + _aligned(lrec & MAX_LENGTH)
            if pos > size:
                raise self._err(
                    offsets[-1] if first else pos,
                    f"truncated record: length runs past the end of the file ({size} bytes)",
                )
        if not first:
            raise self._err(offsets[-1], "multi-part record has no last part (cflag 3)")
        return np.asarray(offsets, dtype=np.int64)

    def read_labels(self, positions: np.ndarray, width: int = 2) -> tuple[np.ndarray, np.ndarray]:
        """Header-only read of records at rows ``positions`` (not keys) of the index.

        Returns ``flag`` (n,) int64 and ``labels`` (n, width) float32: column 0 is the header
        label when flag == 0, else the first ``min(flag, width)`` float32 labels (NaN beyond).
        Vectorised gather through mmap; odd records (multi-part, near EOF, damaged) go through
        ``read_idx`` + ``unpack`` so that their errors are the usual ones.
        """
        positions = np.asarray(positions, dtype=np.int64)
        n = len(positions)
        flags = np.zeros(n, np.int64)
        labels = np.full((n, width), np.nan, np.float32)
        if n == 0:
            return flags, labels
        need = 8 + IR_SIZE + 4 * width
        mm = self._mmap()
        if mm is None:
            raise self._err(0, "empty .rec file, expected records")
        arr = np.frombuffer(mm, np.uint8)
        cols = np.arange(need, dtype=np.int64)
        try:
            for a in range(0, n, 1 << 16):
                pos = positions[a : a + (1 << 16)]
                off = self.offsets[pos]
                fits = (off >= 0) & (off % 4 == 0) & (off + need <= self.size)
                w = np.zeros((len(off), need // 4), np.uint32)
                if fits.any():
                    w[fits] = arr[off[fits, None] + cols].view("<u4")
                lrec = w[:, 1]
                nlen = (lrec & MAX_LENGTH).astype(np.int64)
                flag = w[:, 2].astype(np.int64)
                ok = (
                    fits
                    & (w[:, 0] == MAGIC)
                    & (lrec >> 29 == 0)
                    & (nlen >= IR_SIZE + 4 * np.minimum(flag, width))
                    & (off + 8 + ((nlen + 3) & ~3) <= self.size)
                )
                out = labels[a : a + len(off)]
                f = flags[a : a + len(off)]
                f[ok] = flag[ok]
                scalar = ok & (flag == 0)
                out[scalar, 0] = w[scalar, 3].view("<f4")
                vec = w[:, 2 + IR_SIZE // 4 :].view("<f4")
                for j in range(width):
                    m = ok & (flag > j)
                    out[m, j] = vec[m, j]
                for i in np.flatnonzero(~ok):
                    p = int(pos[i])
                    hdr, _ = unpack(self.read_idx(int(self.key_array[p])))
                    f[i] = hdr.flag
                    if hdr.flag == 0:
                        out[i, 0] = hdr.label
                    else:
                        k = min(hdr.flag, width)
                        out[i, :k] = hdr.label[:k]
        finally:
            del arr
        return flags, labels


def _next_distinct(sorted_offsets: np.ndarray, size: int) -> np.ndarray:
    """For each sorted offset, the next larger offset (``size`` for the largest ones)."""
    uniq, inverse = np.unique(sorted_offsets, return_inverse=True)
    nxt = np.append(uniq[1:], size)
    return nxt[inverse]
