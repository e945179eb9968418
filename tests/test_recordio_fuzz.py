"""Fuzzing the RecordIO reader: damaged files give records or RecordIOError, nothing else.

Random files and mutations of a valid one (flipped bytes, truncation, bad lengths, bad .idx
offsets) go through every read path: open (index check / rebuild), scan, read by key,
``read_at``, ``unpack`` and ``read_layout``. Any other exception, or a hang (pytest-timeout),
fails. With ``atheris`` installed the same harness runs standalone:

    python tests/test_recordio_fuzz.py -atheris_runs=100000
"""

from __future__ import annotations

import struct
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.layout import read_layout
from data.recordio import MAGIC_BYTES, IRHeader, RecordIOError, RecordReader, encode_record, pack


def valid_dataset() -> tuple[bytes, str]:
    """A small InsightFace-layout .rec (one multi-part image) and its .idx text."""
    records = [pack(IRHeader(2, [4, 6], 0, 0), b"")]
    payloads = [b"\xff\xd8" + b"a" * 10, b"b" * 6 + b"xy" + MAGIC_BYTES + b"c" * 5, b"d" * 3]
    records += [pack(IRHeader(0, float(k > 1), k, 0), p) for k, p in enumerate(payloads, 1)]
    records += [pack(IRHeader(2, [1, 2], 4, 0), b""), pack(IRHeader(2, [2, 4], 5, 0), b"")]
    raw, lines = b"", []
    for key, rec in enumerate(records):
        lines.append(f"{key}\t{len(raw)}\n")
        raw += encode_record(rec)
    return raw, "".join(lines)


VALID_REC, VALID_IDX = valid_dataset()


def exercise(rec_bytes: bytes, idx_text: str | None, folder: Path) -> None:
    """Run every read path; only RecordIOError may escape from them (caught here)."""
    rec, idx = folder / "f.rec", folder / "f.idx"
    rec.write_bytes(rec_bytes)
    if idx_text is None:
        idx.unlink(missing_ok=True)
    else:
        idx.write_text(idx_text)
    try:
        reader = RecordReader(rec)
    except RecordIOError:
        return
    with reader:
        try:
            scanned = list(reader)
        except RecordIOError:
            scanned = []
        for offset, record in scanned[:20]:
            assert reader.read_at(offset)[0] == record
        for key in reader.keys[:20]:
            try:
                reader.read_idx(key)
            except RecordIOError:
                pass
        try:
            read_layout(reader)
        except RecordIOError:
            pass


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


FUZZ = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def test_valid_dataset_reads(folder):
    exercise(VALID_REC, VALID_IDX, folder)
    with RecordReader(folder / "f.rec") as r:
        assert len(read_layout(r)) == 3 and len(list(r)) == 6


@pytest.mark.timeout(60)
@FUZZ
@given(st.binary(max_size=300), st.one_of(st.none(), st.text(max_size=80)))
def test_random_files(folder, rec_bytes, idx_text):
    exercise(rec_bytes, idx_text, folder)


@pytest.mark.timeout(60)
@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID_REC) - 1), st.integers(1, 255)), max_size=4))
def test_flipped_bytes(folder, flips):
    raw = bytearray(VALID_REC)
    for pos, xor in flips:
        raw[pos] ^= xor
    exercise(bytes(raw), VALID_IDX, folder)
    exercise(bytes(raw), None, folder)


@pytest.mark.timeout(60)
@FUZZ
@given(st.integers(0, len(VALID_REC)), st.booleans())
def test_truncation(folder, cut, keep_idx):
    exercise(VALID_REC[:cut], VALID_IDX if keep_idx else None, folder)


@pytest.mark.timeout(60)
@FUZZ
@given(st.integers(0, 5), st.integers(0, 2**32 - 1), st.booleans())
def test_bad_lengths(folder, which, lrec, keep_idx):
    offsets = [int(line.split("\t")[1]) for line in VALID_IDX.splitlines()]
    raw = bytearray(VALID_REC)
    struct.pack_into("<I", raw, offsets[which] + 4, lrec)
    exercise(bytes(raw), VALID_IDX if keep_idx else None, folder)


@pytest.mark.timeout(60)
@FUZZ
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(-(2**70), 2**70)), max_size=3))
def test_bad_idx_offsets(folder, changes):
    lines = VALID_IDX.splitlines()
    for line_no, offset in changes:
        lines[line_no] = f"{line_no}\t{offset}"
    exercise(VALID_REC, "\n".join(lines) + "\n", folder)


@pytest.mark.timeout(60)
@FUZZ
@given(st.integers(0, 5), st.sampled_from([1, 2, 3, 4, 8, 12]))
def test_shifted_idx_offsets(folder, line_no, shift):
    lines = VALID_IDX.splitlines()
    key, offset = lines[line_no].split("\t")
    lines[line_no] = f"{key}\t{int(offset) + shift}"
    exercise(VALID_REC, "\n".join(lines) + "\n", folder)


# ---------------------------------------------------------------- atheris (optional)
_ATHERIS_DIR: Path | None = None


def atheris_one_input(data: bytes) -> None:
    """atheris entry point: first byte picks the idx mode, the rest is the .rec."""
    global _ATHERIS_DIR
    if _ATHERIS_DIR is None:
        _ATHERIS_DIR = Path(tempfile.mkdtemp(prefix="recordio-fuzz-"))
    mode = data[0] % 3 if data else 0
    body = data[1:]
    if mode == 0:
        exercise(body, None, _ATHERIS_DIR)
    elif mode == 1:
        exercise(body, VALID_IDX, _ATHERIS_DIR)
    else:  # mutate the valid file: body bytes xor-ed over it
        raw = bytes(
            a ^ b for a, b in zip(VALID_REC, body.ljust(len(VALID_REC), b"\0"), strict=False)
        )
        exercise(raw, VALID_IDX, _ATHERIS_DIR)


def test_atheris_harness():
    pytest.importorskip("atheris")
    for seed in [b"", b"\x00" + VALID_REC, b"\x01" + VALID_REC[:20], b"\x02\xff\x01"]:
        atheris_one_input(seed)


if __name__ == "__main__":
    import atheris

    atheris.Setup(sys.argv, atheris_one_input)
    atheris.Fuzz()
