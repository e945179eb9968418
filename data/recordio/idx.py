"""``.idx`` files: one ``key<TAB>byte offset`` line per record, as ``MXIndexedRecordIO`` writes."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from data.recordio.frame import RecordIOError


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


class KeyIndex:
    """Key -> row -> byte offset of a .rec's records, and each record's extent.

    ``key_array``, ``offsets``: ``(n,)`` int64 in .idx order. ``extents``: ``(n,)`` distance
    from each offset to the next larger indexed offset (EOF for the last), so that a checked
    read of a multi-part or damaged record needs one ``pread``. Contiguous keys (the usual
    0..n-1 or 1..n) are looked up arithmetically, others through a dict.
    """

    def __init__(self, keys: np.ndarray, offsets: np.ndarray, size: int, where: Path):
        self.key_array = keys
        self.offsets = offsets
        self.where = where  # the .idx path, for KeyError messages
        order = np.argsort(offsets, kind="stable")
        srt = offsets[order]
        uniq, inverse = np.unique(srt, return_inverse=True)
        ext = np.empty_like(offsets)
        ext[order] = np.append(uniq[1:], size)[inverse] - srt
        self.extents = ext
        n = len(keys)
        if n and keys[0] >= 0 and (keys == np.arange(keys[0], keys[0] + n)).all():
            self._key_base: int | None = int(keys[0])
            self._key_pos: dict[int, int] | None = None
        else:
            self._key_base = None
            self._key_pos = {k: i for i, k in enumerate(keys.tolist())}

    def __len__(self) -> int:
        return len(self.key_array)

    def position(self, key: int) -> int:
        """Row of ``key`` in ``key_array`` / ``offsets`` (KeyError if absent)."""
        if self._key_base is not None:
            i = key - self._key_base
            if 0 <= i < len(self.key_array):
                return int(i)
        elif key in self._key_pos:
            return self._key_pos[key]
        raise KeyError(f"{self.where}: no key {key}")

    def positions(self, keys) -> np.ndarray:
        """Rows of many ``keys`` at once: ``(n,)`` int64 (KeyError naming the first absent key)."""
        keys = np.asarray(keys, dtype=np.int64)
        if self._key_base is not None:
            pos = keys - self._key_base
            bad = (pos < 0) | (pos >= len(self.key_array))
            if bad.any():
                raise KeyError(f"{self.where}: no key {int(keys[bad.argmax()])}")
            return pos
        return np.fromiter((self.position(k) for k in keys.tolist()), np.int64, len(keys))
