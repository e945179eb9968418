"""RecordIO framing: the 8-byte record header, split parts and the on-disk bytes of a record.

A record on disk (dmlc-core ``recordio.h``), all little-endian::

    u32 magic 0xCED7230A | u32 lrec = cflag << 29 | length | data (length bytes) | zero pad to 4

``cflag`` 0 is a whole record. When the data holds the magic at a 4-aligned offset, MXNet's
writer splits the record there, drops that magic and writes parts with cflag 1 (first),
2 (middle), 3 (last); the reader puts the magic back between the parts.

``parse_head`` is the one reader of that header (``whole_records`` is its vectorised form for
header-only gathers); every read path of ``RecordReader`` goes through it.
"""

from __future__ import annotations

import struct

import numpy as np

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
MAX_LENGTH = (1 << 29) - 1  # lrec keeps the length in its low 29 bits
HEAD = struct.Struct("<II")  # (magic, lrec)


class RecordIOError(ValueError):
    """A RecordIO / .idx file is not what it should be (message: file, key/offset, expected)."""


class HeadError(RecordIOError):
    """A bad 8-byte record header. ``reason`` says what was expected; the caller adds the file,
    key and offset. ``wrong_magic`` tells a missing magic from a truncated record."""

    def __init__(self, reason: str, wrong_magic: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.wrong_magic = wrong_magic


def aligned(n: int) -> int:
    """``n`` rounded up to a multiple of 4 (records are zero-padded to 4 bytes)."""
    return (n + 3) & ~3


def parse_head(buf, rel: int, offset: int, size: int) -> tuple[int, int]:
    """``(cflag, length)`` of the header at ``buf[rel:]``, the part at file ``offset``.

    Checks that the 8 header bytes exist, the magic, and that the padded part fits in a file of
    ``size`` bytes; raises ``HeadError`` otherwise.
    """
    if len(buf) - rel < 8 or offset + 8 > size:
        raise HeadError(f"truncated record header (file ends at {size})")
    magic, lrec = HEAD.unpack_from(buf, rel)
    if magic != MAGIC:
        raise HeadError(f"expected magic 0x{MAGIC:08x}, found 0x{magic:08x}", wrong_magic=True)
    n = lrec & MAX_LENGTH
    if offset + 8 + aligned(n) > size:
        raise HeadError(
            f"truncated record: length {n} (+8 header, padded) runs past the end of the file "
            f"({size} bytes)"
        )
    return lrec >> 29, n


def whole_records(
    magic: np.ndarray, lrec: np.ndarray, offsets: np.ndarray, size: int
) -> np.ndarray:
    """``parse_head``'s checks over many headers at once, for a whole (cflag 0) record.

    ``magic``, ``lrec``: ``(n,)`` uint32 header words of the records at ``offsets`` ``(n,)``
    int64. Returns ``(n,)`` bool: the magic is there, cflag is 0 and the padded record fits.
    """
    length = (lrec & MAX_LENGTH).astype(np.int64)
    return (magic == MAGIC) & (lrec >> 29 == 0) & (offsets + 8 + ((length + 3) & ~3) <= size)


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
    pad = b"\0" * (aligned(n) - n)
    if MAGIC_BYTES not in data:
        return HEAD.pack(MAGIC, n) + bytes(data) + pad
    out = []
    for cflag, a, b in split_parts(data):
        out.append(HEAD.pack(MAGIC, cflag << 29 | (b - a)))
        out.append(bytes(data[a:b]))
    out.append(pad)
    return b"".join(out)
