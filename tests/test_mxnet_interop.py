"""Two-way byte compatibility with the real MXNet, where an interpreter with mxnet exists.

mxnet 1.9.1 (its last release) only imports beside numpy < 1.24, so it cannot live in the
project's environment. Point ``MXNET_PYTHON`` at a separate venv's interpreter
(``python -m venv mx && mx/bin/pip install mxnet==1.9.1 'numpy<1.24'``) to run these; without
it they are skipped. The fixtures in tests/fixtures/mxnet_rec cover the same ground always.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from data.recordio import MAGIC, IRHeader, RecordReader, RecordWriter, pack, unpack

MXNET_PYTHON = os.environ.get("MXNET_PYTHON")

pytestmark = pytest.mark.skipif(
    not MXNET_PYTHON, reason="set MXNET_PYTHON to an interpreter where `import mxnet` works"
)


def _payloads(n: int, seed: int) -> list[tuple[float, bytes]]:
    """Random payloads, many carrying the magic at aligned and unaligned offsets."""
    rng = np.random.default_rng(seed)
    magic = MAGIC.to_bytes(4, "little")
    out = []
    for i in range(n):
        data = bytearray(rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes())
        for _ in range(int(rng.integers(0, 4))):
            at = int(rng.integers(0, len(data) + 1))
            data[at:at] = magic
        out.append((float(i % 7), bytes(data)))
    return out


def _run_mxnet(script: str, tmp_path: Path) -> str:
    proc = subprocess.run(
        [MXNET_PYTHON, "-c", textwrap.dedent(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_our_writer_matches_mxnet_writer_byte_for_byte(tmp_path):
    payloads = _payloads(200, seed=1)
    (tmp_path / "payloads.json").write_text(json.dumps([[lab, p.hex()] for lab, p in payloads]))
    _run_mxnet(
        """
        import json, mxnet as mx
        items = json.load(open("payloads.json"))
        w = mx.recordio.MXIndexedRecordIO("mx.idx", "mx.rec", "w")
        for key, (label, hexdata) in enumerate(items):
            header = mx.recordio.IRHeader(0, label, key, 0)
            w.write_idx(key, mx.recordio.pack(header, bytes.fromhex(hexdata)))
        w.close()
        """,
        tmp_path,
    )
    with RecordWriter(tmp_path / "ours.rec", tmp_path / "ours.idx") as w:
        for key, (label, data) in enumerate(payloads):
            w.write_idx(key, pack(IRHeader(0, label, key, 0), data))
    assert (tmp_path / "ours.rec").read_bytes() == (tmp_path / "mx.rec").read_bytes()
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "mx.idx").read_bytes()


def test_mxnet_reads_what_we_write(tmp_path):
    payloads = _payloads(100, seed=2)
    with RecordWriter(tmp_path / "ours.rec", tmp_path / "ours.idx") as w:
        for key, (label, data) in enumerate(payloads):
            w.write_idx(key, pack(IRHeader(0, label, key, 0), data))
    out = _run_mxnet(
        """
        import json, mxnet as mx
        r = mx.recordio.MXIndexedRecordIO("ours.idx", "ours.rec", "r")
        rows = []
        for key in r.keys:
            header, data = mx.recordio.unpack(r.read_idx(key))
            rows.append([key, float(header.label), data.hex()])
        print(json.dumps(rows))
        """,
        tmp_path,
    )
    rows = json.loads(out)
    assert [(k, lab, bytes.fromhex(h)) for k, lab, h in rows] == [
        (k, lab, data) for k, (lab, data) in enumerate(payloads)
    ]
    with RecordReader(tmp_path / "ours.rec") as reader:
        for key, (label, data) in enumerate(payloads):
            header, got = unpack(reader.read_idx(key))
            assert (header.label, got) == (label, data)
