"""The mxnet side of ``bench.data_throughput``: the same .rec read by ``MXIndexedRecordIO``.

mxnet 1.9.1 does not import with numpy >= 1.24, so it runs in another interpreter (a venv with
mxnet, ``--mxnet-python`` / ``$MXNET_PYTHON``) as a small script that prints JSON timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BATCH = 128

# Runs under the mxnet interpreter (numpy < 1.24, no torch): same work as our pipeline.
_MXNET_SCRIPT = r"""
import json, sys, time
import numpy as np
import mxnet as mx
rec, idx, keys_file, repeats, shuffle, batch = sys.argv[1:7]
keys = [int(k) for k in open(keys_file).read().split()]
repeats, shuffle, batch = int(repeats), shuffle == "1", int(batch)
reader = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
rng = np.random.default_rng(0)
def one_pass():
    order = rng.permutation(keys).tolist() if shuffle else keys
    n = 0
    for start in range(0, len(order), batch):
        out = []
        for key in order[start:start + batch]:
            _, img = mx.recordio.unpack(reader.read_idx(key))
            arr = mx.image.imdecode(img).asnumpy()          # (H, W, 3) uint8 RGB
            if rng.random() < 0.5:
                arr = arr[:, ::-1]
            out.append(arr.transpose(2, 0, 1))
        x = (np.stack(out).astype(np.float32) - 127.5) / 127.5
        n += len(x)
    return n
one_pass()
times = []
for _ in range(repeats):
    t = time.perf_counter(); n = one_pass(); times.append(time.perf_counter() - t)
print(json.dumps({"n": n, "times": times, "version": mx.__version__}))
"""


def mxnet_python_path(explicit: str | None) -> tuple[str | None, str]:
    """An interpreter that can ``import mxnet``, or (None, why not)."""
    candidates = [c for c in (explicit, os.environ.get("MXNET_PYTHON"), sys.executable) if c]
    reasons = []
    for py in candidates:
        try:
            r = subprocess.run(
                [py, "-c", "import mxnet"], capture_output=True, text=True, timeout=120
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            reasons.append(f"{py}: {exc}")
            continue
        if r.returncode == 0:
            return py, ""
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        reasons.append(f"{py}: {last[:120]}")
    return None, "skipped: mxnet not importable (" + "; ".join(reasons) + ")"


def time_mxnet(
    py: str, rec_dir: Path, keys: list[int], repeats: int, shuffle: bool, batch: int = BATCH
) -> dict:
    """Times (s) of ``repeats`` passes over ``keys`` after a warm-up, as the script prints them."""
    with tempfile.NamedTemporaryFile("w", suffix=".keys", delete=False) as f:
        f.write(" ".join(map(str, keys)))
    try:
        args = [py, "-c", _MXNET_SCRIPT, str(rec_dir / "train.rec"), str(rec_dir / "train.idx")]
        args += [f.name, str(repeats), "1" if shuffle else "0", str(batch)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MXNET_CPU_WORKER_NTHREADS": "1"}
        r = subprocess.run(args, capture_output=True, text=True, check=True, env=env)
    finally:
        os.unlink(f.name)
    return json.loads(r.stdout.strip().splitlines()[-1])
