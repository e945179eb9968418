"""RecordIO reader/writer against files written by the real MXNet, round trips and bad input."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.recordio import (
    MAGIC,
    MAGIC_BYTES,
    IRHeader,
    RecordIOError,
    RecordReader,
    RecordWriter,
    encode_record,
    pack,
    read_idx_file,
    unpack,
)


def reference_encode(data: bytes) -> bytes:
    """Line-by-line port of dmlc-core ``RecordIOWriter::WriteRecord`` (the oracle)."""
    out = bytearray()
    n = len(data)
    lower, upper = (n >> 2) << 2, ((n + 3) >> 2) << 2
    dptr = 0
    for i in range(0, lower, 4):
        if data[i : i + 4] == MAGIC_BYTES:
            out += struct.pack("<II", MAGIC, (1 if dptr == 0 else 2) << 29 | (i - dptr))
            out += data[dptr:i]
            dptr = i + 4
    out += struct.pack("<II", MAGIC, (3 if dptr != 0 else 0) << 29 | (n - dptr))
    out += data[dptr:] + b"\0" * (upper - n)
    return bytes(out)


def reference_records(raw: bytes) -> list[tuple[int, bytes]]:
    """Port of dmlc-core ``RecordIOReader::NextRecord``: ``(offset, record)`` of every record."""
    out, pos = [], 0
    while pos < len(raw):
        start, rec = pos, b""
        while True:
            magic, lrec = struct.unpack_from("<II", raw, pos)
            assert magic == MAGIC
            cflag, n = lrec >> 29, lrec & ((1 << 29) - 1)
            rec += raw[pos + 8 : pos + 8 + n]
            pos += 8 + ((n + 3) & ~3)
            if cflag in (0, 3):
                break
            rec += MAGIC_BYTES
        out.append((start, rec))
    return out


@pytest.fixture
def expected(mxnet_rec_dir) -> dict:
    return json.loads((mxnet_rec_dir / "expected.json").read_text())


@pytest.fixture
def reader(mxnet_rec_dir):
    with RecordReader(mxnet_rec_dir / "train.rec") as r:
        yield r


def write_records(tmp_path, records, name="x"):
    rec, idx = tmp_path / f"{name}.rec", tmp_path / f"{name}.idx"
    with RecordWriter(rec, idx) as w:
        for k, data in enumerate(records):
            w.write_idx(k, data)
    return rec, idx


# ---------------------------------------------------------------- MXNet-written fixture
def test_fixture_images_bytes_and_labels(reader, expected):
    assert not reader.rebuilt
    for image in expected["images"]:
        header, payload = unpack(reader.read_idx(image["key"]))
        assert hashlib.sha256(payload).hexdigest() == image["sha256"], image["key"]
        assert header.flag == 0 and header.label == image["label"]
        assert header.id == image["key"] and header.id2 == 0


def test_fixture_header_and_identity_records(reader, expected):
    header, payload = unpack(reader.read_idx(0))
    imgnum = len(expected["images"]) + 1
    assert header.flag == 2 and payload == b""
    assert header.label.tolist() == [imgnum, imgnum + len(expected["identities"])]
    for ident in expected["identities"]:
        header, payload = unpack(reader.read_idx(ident["key"]))
        assert header.flag == 2 and payload == b""
        assert header.label.tolist() == ident["range"]


def test_fixture_multipart_record_is_three_parts_on_disk(reader, expected, mxnet_rec_dir):
    (image,) = [i for i in expected["images"] if i["multipart"]]
    raw = (mxnet_rec_dir / "train.rec").read_bytes()
    offset = int(reader.offsets[reader.position(image["key"])])
    pos, cflags = offset, []
    while True:
        magic, lrec = struct.unpack_from("<II", raw, pos)
        assert magic == MAGIC
        cflags.append(lrec >> 29)
        pos += 8 + (((lrec & (2**29 - 1)) + 3) & ~3)
        if cflags[-1] in (0, 3):
            break
    assert cflags == [1, 2, 3]
    record = reader.read_idx(image["key"])
    assert record.count(MAGIC_BYTES) >= 2  # the two dropped magics were put back
    assert hashlib.sha256(unpack(record)[1]).hexdigest() == image["sha256"]


def test_fixture_scan_matches_reference_reader(reader, mxnet_rec_dir):
    raw = (mxnet_rec_dir / "train.rec").read_bytes()
    ref = reference_records(raw)
    assert list(reader) == ref
    assert reader.offsets.tolist() == [o for o, _ in ref]
    assert reader.scan_offsets().tolist() == [o for o, _ in ref]
    offset = 0
    for ref_offset, ref_record in ref:  # read_at walks the same chain
        assert offset == ref_offset
        record, offset = reader.read_at(offset)
        assert record == ref_record
    assert offset == len(raw)


def test_writer_reproduces_mxnet_files_byte_for_byte(reader, mxnet_rec_dir, tmp_path):
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    with RecordWriter(rec, idx) as w:
        for key in reader.keys:
            w.write_idx(key, reader.read_idx(key))
    assert rec.read_bytes() == (mxnet_rec_dir / "train.rec").read_bytes()
    assert idx.read_bytes() == (mxnet_rec_dir / "train.idx").read_bytes()


def test_pack_matches_struct_reference():
    img = b"\xff\xd8 payload"
    assert pack(IRHeader(0, 3.0, 7, 9), img) == struct.pack("<IfQQ", 0, 3.0, 7, 9) + img
    multi = pack(IRHeader(0, [1.5, 2.0, 8.0], 4, 0), img)
    ref = struct.pack("<IfQQ", 3, 0.0, 4, 0) + np.float32([1.5, 2, 8]).tobytes() + img
    assert multi == ref
    header, payload = unpack(multi)
    assert header.flag == 3 and header.label.tolist() == [1.5, 2.0, 8.0] and payload == img
    header, payload = unpack(pack(IRHeader(5, np.float32(2.0), 1, 2), img))  # numpy scalar
    assert (header.flag, header.label, header.id, header.id2, payload) == (0, 2.0, 1, 2, img)


# ---------------------------------------------------------------- round trips
def test_round_trip_lengths_and_padding(tmp_path):
    rng = np.random.default_rng(0)
    records = [rng.bytes(n) for n in [0, 1, 2, 3, 4, 5, 7, 8, 4096, 100_001]]
    records += [MAGIC_BYTES, MAGIC_BYTES * 3, b"ab" + MAGIC_BYTES, MAGIC_BYTES + b"x"]
    rec, _ = write_records(tmp_path, records)
    assert rec.read_bytes() == b"".join(reference_encode(r) for r in records)
    with RecordReader(rec) as r:
        assert [r.read_idx(k) for k in r.keys] == records
        assert [rec_ for _, rec_ in r] == records
        assert len(r) == len(records)


def test_reader_is_picklable_and_reads_in_forked_workers(reader):
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read_idx(4) == reader.read_idx(4)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        got = pool.map(reader.read_idx, reader.keys)
    assert got == [reader.read_idx(k) for k in reader.keys]


def _read_in_child(reader, queue):
    queue.put(([reader.read_idx(k) for k in reader.keys], reader.file.pid == os.getpid()))


def test_reader_used_before_fork_reopens_in_child(reader):
    expected = [reader.read_idx(k) for k in reader.keys]  # parent's handle is open now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(reader, queue))
    child.start()
    records, own_handle = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0 and records == expected and own_handle
    assert reader.file.pid == os.getpid() and reader.read_idx(4) == expected[4]


@settings(max_examples=60, deadline=None)
@given(
    st.binary(max_size=64),
    st.lists(st.tuples(st.integers(0, 64), st.booleans()), max_size=6),
)
def test_property_payloads_with_magic(tmp_path_factory, base, inserts):
    """Magic at random aligned/unaligned offsets: same bytes as dmlc-core, exact read back."""
    data = bytearray(base)
    for where, aligned in inserts:
        pos = min(where, len(data))
        pos = pos - pos % 4 if aligned else pos | 1
        data[pos:pos] = MAGIC_BYTES
    data = bytes(data)
    assert encode_record(data) == reference_encode(data)
    tmp = tmp_path_factory.mktemp("prop")
    records = [data, b"tail", data[::-1]]
    rec, _ = write_records(tmp, records)
    with RecordReader(rec) as r:
        assert [r.read_idx(k) for k in range(3)] == records
        assert [x for _, x in r] == records


# ---------------------------------------------------------------- .idx handling
def test_missing_idx_is_rebuilt_with_a_message(reader, mxnet_rec_dir, tmp_path, caplog):
    rec = tmp_path / "train.rec"
    rec.write_bytes((mxnet_rec_dir / "train.rec").read_bytes())
    with caplog.at_level(logging.WARNING, logger="data.recordio"):
        r = RecordReader(rec)
    assert r.rebuilt and "missing" in caplog.text and "rebuilding" in caplog.text
    assert r.keys == reader.keys and r.offsets.tolist() == reader.offsets.tolist()
    with pytest.raises(RecordIOError, match="missing"):
        RecordReader(rec, rebuild_idx=False)


def test_stale_idx_is_rebuilt(tmp_path, caplog):
    rec, idx = write_records(tmp_path, [b"a" * 10, b"b" * 20])
    old_idx = idx.read_text()
    write_records(tmp_path, [b"a" * 10, b"b" * 20, b"c" * 30])
    idx.write_text(old_idx)  # .rec grew after the .idx was written
    with caplog.at_level(logging.WARNING, logger="data.recordio"):
        r = RecordReader(rec)
    assert r.rebuilt and "stale" in caplog.text
    assert r.read_idx(2) == b"c" * 30
    with pytest.raises(RecordIOError, match="stale"):
        RecordReader(rec, rebuild_idx=False)


def test_idx_file_parsing(tmp_path):
    p = tmp_path / "a.idx"
    p.write_text("0\t0\n5\t40\n2\t1000\n")
    keys, offsets = read_idx_file(p)
    assert keys.tolist() == [0, 5, 2] and offsets.tolist() == [0, 40, 1000]
    p.write_text("0\t0\n1 40\n")
    with pytest.raises(RecordIOError, match="line 2"):
        read_idx_file(p)
    p.write_text("0\t0\nx\t40\n")
    with pytest.raises(RecordIOError, match="line 2"):
        read_idx_file(p)


def test_non_contiguous_keys(tmp_path):
    rec, idx = tmp_path / "k.rec", tmp_path / "k.idx"
    with RecordWriter(rec, idx) as w:
        for key in [10, 3, 99]:
            w.write_idx(key, str(key).encode())
    with RecordReader(rec) as r:
        assert r.keys == [10, 3, 99]
        assert r.read_idx(99) == b"99" and r.read_idx(3) == b"3"
        assert 4 not in r
        with pytest.raises(KeyError, match="no key 4"):
            r.read_idx(4)


# ---------------------------------------------------------------- bad input
def test_wrong_magic(tmp_path):
    rec, _ = write_records(tmp_path, [b"a" * 8, b"b" * 8, b"c" * 8])
    raw = bytearray(rec.read_bytes())
    raw[16:20] = b"\0\0\0\0"  # magic of the second record
    rec.write_bytes(bytes(raw))
    r = RecordReader(rec)
    with pytest.raises(RecordIOError, match=r"offset 16.*expected magic 0xced7230a"):
        r.read_idx(1)
    with pytest.raises(RecordIOError, match=r"offset 16: wrong magic"):
        list(r)
    with pytest.raises(RecordIOError, match=r"offset 16: wrong magic"):
        r.read_at(16)
    (tmp_path / "x.idx").unlink()
    with pytest.raises(RecordIOError, match=r"offset 16: wrong magic"):
        RecordReader(rec)  # the rebuild scan finds it too


def test_truncated_record(tmp_path):
    rec, _ = write_records(tmp_path, [b"a" * 8, b"b" * 100])
    rec.write_bytes(rec.read_bytes()[:-10])
    with pytest.raises(RecordIOError, match=r"offset 16.*truncated record"):
        RecordReader(rec)  # the .idx no longer matches the .rec and the rescan hits the cut
    with pytest.raises(RecordIOError, match="runs past the end"):
        RecordReader(rec, rebuild_idx=False).read_idx(1)


def test_length_past_eof(tmp_path):
    rec, _ = write_records(tmp_path, [b"a" * 8, b"b" * 8])
    raw = bytearray(rec.read_bytes())
    raw[4:8] = struct.pack("<I", 1000)  # first record claims 1000 bytes
    rec.write_bytes(bytes(raw))
    r = RecordReader(rec)
    with pytest.raises(RecordIOError, match=r"key 0 \(offset 0.*length 1000.*past the end"):
        r.read_idx(0)
    with pytest.raises(RecordIOError, match="offset 0"):
        r.read_at(0)


def test_idx_offset_not_at_a_record(tmp_path):
    rec, idx = write_records(tmp_path, [b"a" * 8, b"b" * 8, b"c" * 8])
    idx.write_text("0\t0\n1\t20\n2\t32\n")  # key 1 really starts at 16
    r = RecordReader(rec)
    with pytest.raises(RecordIOError, match=r"key 1 \(offset 20.*does not point at a record"):
        r.read_idx(1)
    idx.write_text("0\t0\n1\t18\n2\t32\n")
    with pytest.raises(RecordIOError, match=r"key 1 \(offset 18.*not a record boundary"):
        RecordReader(rec).read_idx(1)


def test_broken_multipart_chain(tmp_path):
    rec, _ = write_records(tmp_path, [b"xxxx" + MAGIC_BYTES + b"yyyy"])
    raw = rec.read_bytes()
    assert raw[4:8] == struct.pack("<I", 1 << 29 | 4)
    rec.write_bytes(raw[:12])  # first part only
    with pytest.raises(RecordIOError):
        RecordReader(rec)
    (tmp_path / "y.rec").write_bytes(raw[12:])  # starts with the last part (cflag 3)
    with pytest.raises(RecordIOError, match="cflag 3"):
        RecordReader(tmp_path / "y.rec")


def test_unpack_short_records():
    with pytest.raises(RecordIOError, match="shorter than the 24-byte"):
        unpack(b"\0" * 10)
    with pytest.raises(RecordIOError, match="3 float32 labels"):
        unpack(struct.pack("<IfQQ", 3, 0.0, 0, 0) + b"\0" * 4)


def test_interop_with_mxnet(tmp_path, reader, mxnet_rec_dir):
    mx = pytest.importorskip("mxnet")
    rec = mx.recordio.MXIndexedRecordIO(
        str(mxnet_rec_dir / "train.idx"), str(mxnet_rec_dir / "train.rec"), "r"
    )
    for key in reader.keys:
        assert rec.read_idx(key) == reader.read_idx(key)
