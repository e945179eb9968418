"""The 24-byte ``IfQQ`` image record header (flag, label, id, id2), as ``mxnet.recordio``.

When flag > 0, ``flag`` float32 labels follow the header before the image bytes.
"""

from __future__ import annotations

import numbers
import struct
from dataclasses import dataclass

import numpy as np

from data.recordio.frame import RecordIOError

IR_FORMAT = "<IfQQ"
IR_SIZE = 24
IR = struct.Struct(IR_FORMAT)


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
        return IR.pack(0, label, header.id, header.id2) + bytes(payload)
    arr = np.asarray(label, dtype=np.float32)
    return IR.pack(arr.size, 0.0, header.id, header.id2) + arr.tobytes() + bytes(payload)


def unpack(record: bytes) -> tuple[IRHeader, bytes]:
    """``(header, payload)`` from a record, exactly as ``mxnet.recordio.unpack``."""
    if len(record) < IR_SIZE:
        raise RecordIOError(
            f"record of {len(record)} bytes is shorter than the {IR_SIZE}-byte IfQQ header"
        )
    flag, label, id_, id2 = IR.unpack_from(record)
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
