"""Part 4 of the GPU check: the head step on the device at N = 10^6 and 10^7 (``bench.head_speed``).

Per (N, D), B = 512, M = 8192, each variant timed alone (the real ``HeadBench`` step:
select, gather, forward, backward, update, synchronised around every phase):

- ``random``, ``annoy``: sparse rows, W resident on the device; then the same with W offloaded
  to pinned host memory (``[offload]``: only W[A] crosses to the device; the annoy index is
  built once and shared);
- ``dense-update``: the random sampler's rows with a dense N x D optimizer step (Partial FC v2);
- ``full``: dense softmax over all N classes, where it fits in device memory.

Reported per variant: median step, phases, ``torch.cuda.max_memory_allocated`` during the timed
steps (``peak_device_bytes``) and the device memory held before them (``device_state_bytes``).
W is generated on the device (family rows, ``family_rows_torch``), so 10^7 x 512 takes seconds.
Each point runs in its own process under its own limit (a cumulative share of ``--budget``)
and rewrites ``point_<N>x<D>.json`` after every variant; ``head.json`` merges them.

    python -m bench.gpu.head --out gpu_results/head --budget 120          # all points
    python -m bench.gpu.head --out ... --point 1000000x256 --seconds 2.5  # one point (worker)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from bench.gpu.head_point import Point
from bench.gpu.proc import Deadlines, run_bounded

REAL = {
    "points": [(10**6, 256), (10**7, 256), (10**6, 512), (10**7, 512)],
    "caps": [28.0, 36.0, 26.0, 34.0],
    "batch": 512,
    "num": 8192,
    "seconds": 2.5,
    "annoy_max_n": 10**6,
}
DRY = {
    "points": [(1000, 16), (5000, 16)],
    "caps": [1.0, 1.0],
    "batch": 16,
    "num": 64,
    "seconds": 0.1,
    "annoy_max_n": 10**6,
}


def worker(args: argparse.Namespace) -> int:
    import torch

    from bench.common import setup_logging

    setup_logging()
    cfg = dict(DRY if args.dry_run else REAL)
    if args.seconds is not None:
        cfg["seconds"] = args.seconds
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:  # a CI box's few shared cores: more threads only wait on each other
        torch.set_num_threads(1)
    if device == "cuda" and not torch.cuda.is_available():
        print("bench.gpu.head: no CUDA device", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in args.point:
        n, d = (int(x) for x in spec.split("x"))
        Point(n, d, cfg, device, args.out / f"point_{n}x{d}.json").run_all()
    return 0


def merge(out: Path, cfg: dict[str, Any], ran: list[dict[str, Any]], device: str) -> dict:
    """head.json: every point's rows (also of points cut short by their limit)."""
    results, points = [], []
    for (n, d), r in zip(cfg["points"], ran, strict=False):
        f = out / f"point_{n}x{d}.json"
        data = json.loads(f.read_text()) if f.exists() else {"meta": {}, "results": []}
        results += data["results"]
        points.append({"num_classes": n, "dim": d, **r, "phase": data["meta"].get("phase")})
    merged = {
        "meta": {
            "batch": cfg["batch"],
            "num": cfg["num"],
            "head": "linear",
            "device": device,
            "points": points,
        },
        "results": results,
    }
    (out / "head.json").write_text(json.dumps(merged, indent=1) + "\n")
    return merged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", type=float, default=120.0, help="seconds for all points")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny N")
    ap.add_argument("--point", action="append", help="NxD: run these points in this process")
    ap.add_argument("--seconds", type=float, help="timed seconds per variant")
    args = ap.parse_args(argv)
    if args.point:
        return worker(args)
    cfg = DRY if args.dry_run else REAL
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, "-m", "bench.gpu.head", "--out", str(args.out)]
    base += ["--dry-run"] if args.dry_run else []
    specs = [f"{n}x{d}" for n, d in cfg["points"]]
    ran: list[dict[str, Any]] = []
    if args.dry_run:  # one process for all tiny points (CI-sized)
        cmd = base + [a for s in specs for a in ("--point", s)]
        r = run_bounded(cmd, args.budget, args.out / "head.log", env=env).asdict()
        ran = [r] * len(specs)
    else:
        scale = args.budget / sum(cfg["caps"])
        clock = Deadlines({s: c * scale for s, c in zip(specs, cfg["caps"], strict=True)})
        for s in specs:
            if clock.left(s) < 5:
                ran.append({"status": "skipped: no time left", "seconds": 0.0})
                continue
            cmd = base + ["--point", s]
            ran.append(run_bounded(cmd, clock.left(s), args.out / "head.log", env=env).asdict())
    merge(args.out, cfg, ran, "cpu" if args.dry_run else "cuda")
    return 0


if __name__ == "__main__":
    sys.exit(main())
