"""One (N, D) point of the GPU check's head step (``bench.gpu.head``): every variant timed
alone on the device with the real ``HeadBench`` step, W made on the device.

``Point(n, d, cfg, device, path).run_all()`` times the resident variants on W made on the
device, then moves W to pinned host memory for the ``[offload]`` variants, and rewrites
``path`` (JSON) after every variant so a point cut short by its limit keeps what it measured.
"""

from __future__ import annotations

import gc
import json
import math
import time
from pathlib import Path
from typing import Any

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
