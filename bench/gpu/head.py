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
import gc
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

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
VARIANTS = [
    ("random", False),
    ("annoy", False),
    ("dense-update", False),
    ("full", False),
    ("random", True),
    ("annoy", True),
]


def family_rows_torch(
    n: int,
    d: int,
    device: Any,
    scale: float = 0.05,
    family: int = 10,
    spread: float = 0.35,
    seed: int = 0,
    chunk: int = 1 << 20,
):
    """(N, D) float32 rows in families of near neighbours, made on ``device`` (as
    ``bench.common.family_rows``, torch's RNG): a GPU makes 10^7 x 512 in seconds."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(n, d, device=device)
    for start in range(0, n, chunk):
        m = min(n, start + chunk) - start
        centres = torch.randn(math.ceil(m / family), d, device=device, generator=gen)
        centres /= centres.norm(dim=1, keepdim=True)
        offs = torch.randn(m, d, device=device, generator=gen)
        offs /= offs.norm(dim=1, keepdim=True)
        block = centres.repeat_interleave(family, dim=0)[:m] + spread * offs
        out[start : start + m] = block * (scale / block.norm(dim=1, keepdim=True))
    return out


def device_bytes_needed(variant: str, offload: bool, n: int, d: int, b: int, m: int) -> int:
    """Device memory a variant adds to a resident W: momentum, dense gradient (and torch SGD's
    weight-decay temporary, one more N x D), B x N logits and their gradients."""
    row, small = n * d * 4, 8 * (b * m + m * d) * 4
    if offload:
        return small
    if variant == "full":
        return 3 * row + 4 * b * n * 4 + small
    if variant == "dense-update":
        return 3 * row + small
    return row + small


class Point:
    """Times the variants of one (N, D) on ``device``; results go to ``path`` as they come."""

    def __init__(self, n: int, d: int, cfg: dict[str, Any], device: str, path: Path) -> None:
        import torch

        self.torch = torch
        self.n, self.d, self.cfg, self.device, self.path = n, d, cfg, torch.device(device), path
        self.cuda = self.device.type == "cuda"
        self.results: list[dict[str, Any]] = []
        self.index = None  # the annoy index, built once, shared by resident and offload
        self.t0 = time.perf_counter()

    def save(self, **extra: Any) -> None:
        meta = {
            "num_classes": self.n,
            "dim": self.d,
            "device": str(self.device),
            "seconds": time.perf_counter() - self.t0,
            **extra,
        }
        self.path.write_text(json.dumps({"meta": meta, "results": self.results}, indent=1) + "\n")

    def skip(self, variant: str, offload: bool, note: str) -> None:
        self.results.append(self._row(variant, offload, note=note))
        self.save()

    def _row(self, variant: str, offload: bool, **kw: Any) -> dict[str, Any]:
        label = variant + (" [offload]" if offload else "")
        return {
            "variant": label,
            "sampler": variant,
            "offload": offload,
            "num_classes": self.n,
            "dim": self.d,
            "batch": self.cfg["batch"],
            "num": self.cfg["num"],
            "step_s": None,
            "steps": 0,
            "splits": {},
            "build_s": None,
            "device_state_bytes": None,
            "peak_device_bytes": None,
            "note": "",
            **kw,
        }

    def run(self, variant: str, offload: bool, weight: Any) -> None:
        from bench.head_step import HeadBench

        torch, cfg = self.torch, self.cfg
        if variant == "annoy" and self.n > cfg["annoy_max_n"]:
            return self.skip(
                variant,
                offload,
                "skipped: an annoy build over this many rows does not fit the check's time",
            )
        if self.cuda:
            need = device_bytes_needed(variant, offload, self.n, self.d, cfg["batch"], cfg["num"])
            free = torch.cuda.mem_get_info(self.device)[0]
            if need > 0.9 * free:
                return self.skip(
                    variant,
                    offload,
                    f"skipped: needs ~{need / 2**30:.1f} GiB of "
                    f"device memory, {free / 2**30:.1f} GiB free",
                )
        hb = None
        try:
            hb = HeadBench(
                variant,
                self.n,
                self.d,
                cfg["batch"],
                cfg["num"],
                "linear",
                str(self.device),
                "clustered",
                offload,
                {},
                weight=weight,
            )
            build_s = None
            if hb.clf.sampler.needs_index:
                if self.index is None:
                    build_s = hb.build()
                    self.index = hb.clf.sampler.index
                else:
                    hb.clf.sampler.swap(self.index)
            for _ in range(2):  # warm-up: kernels, lazily allocated gradient / momentum
                hb.step(record=False)
            if self.cuda:
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            state = torch.cuda.memory_allocated(self.device) if self.cuda else None
            start = time.perf_counter()
            while len(hb.times) < 3 or (
                len(hb.times) < 50 and time.perf_counter() - start < cfg["seconds"]
            ):
                hb.step()
            peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else None
            self.results.append(
                self._row(
                    variant,
                    offload,
                    step_s=sorted(hb.times)[len(hb.times) // 2],
                    steps=len(hb.times),
                    splits=hb.sw.medians(),
                    build_s=build_s,
                    device_state_bytes=state,
                    peak_device_bytes=peak,
                )
            )
        except Exception as exc:  # noqa: BLE001 - OOM or a failure: recorded, the next one runs
            self.results.append(self._row(variant, offload, note=f"failed: {exc!r}"[:300]))
        finally:
            del hb
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
        self.save()

    def run_all(self) -> None:
        torch = self.torch
        w = family_rows_torch(self.n, self.d, self.device)  # resident W (N, D) on the device
        self.save(phase="resident")
        for variant, offload in VARIANTS:
            if not offload:
                self.run(variant, False, w)
        # offload: W in (pinned) host memory; the device copy is released first
        host = torch.empty((self.n, self.d), pin_memory=self.cuda)
        host.copy_(w)
        del w
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        for variant, offload in VARIANTS:
            if offload:
                self.run(variant, True, host)
        self.save(phase="done")


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
