"""``RecordWriter``: .rec (and .idx) files byte-identical to ``mx.recordio.MXIndexedRecordIO``."""

from __future__ import annotations

import os
from pathlib import Path

from data.recordio.frame import RecordIOError, encode_record


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
