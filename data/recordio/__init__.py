"""Native MXNet RecordIO: records, the ``IfQQ`` image header and ``.idx`` files, without mxnet.

A record on disk (dmlc-core ``recordio.h``), all little-endian::

    u32 magic 0xCED7230A | u32 lrec = cflag << 29 | length | data (length bytes) | zero pad to 4

``cflag`` 0 is a whole record; 1/2/3 are the parts of a record whose data held the magic at a
4-aligned offset (``frame``). ``.idx`` files hold ``key<TAB>byte offset`` lines (``idx``).
Image records start with the 24-byte header ``IfQQ`` (flag, label, id, id2); when flag > 0,
``flag`` float32 labels follow it (``image_header``). ``RecordWriter`` (``writer``) writes
files byte-identical to MXNet's; ``RecordReader`` (``reader``) reads them by key or in file
order, picklable and fork-safe; ``labels`` reads the labels of many records from their headers.
"""

from data.recordio.frame import (
    MAGIC,
    MAGIC_BYTES,
    MAX_LENGTH,
    HeadError,
    RecordIOError,
    encode_record,
    parse_head,
    split_parts,
)
from data.recordio.idx import KeyIndex, read_idx_file, write_idx_file
from data.recordio.image_header import IR_FORMAT, IR_SIZE, IRHeader, pack, unpack
from data.recordio.reader import RecordReader
from data.recordio.writer import RecordWriter

__all__ = [
    "IR_FORMAT",
    "IR_SIZE",
    "MAGIC",
    "MAGIC_BYTES",
    "MAX_LENGTH",
    "HeadError",
    "IRHeader",
    "KeyIndex",
    "RecordIOError",
    "RecordReader",
    "RecordWriter",
    "encode_record",
    "pack",
    "parse_head",
    "read_idx_file",
    "split_parts",
    "unpack",
    "write_idx_file",
]
