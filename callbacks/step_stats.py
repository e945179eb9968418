"""StepStats: training throughput and peak device memory of a run, written to a JSON file.

Used by the GPU check (``bench/gpu``) on ``python train.py ... +callbacks.step_stats._target_=
callbacks.step_stats.StepStats +callbacks.step_stats.path=<file>``. Step time is the wall
time between consecutive ``on_train_batch_end`` calls (synchronised on CUDA, so queued
kernels are counted), the first ``warmup`` steps left out (cudnn autotuning, the first
index build, lazily allocated optimizer state). The file is rewritten every ``write_every``
steps and at the end, so a run killed by a timeout still leaves its numbers.

Output keys: ``steps`` (optimizer steps seen), ``steps_timed``, ``median_step_s``,
``samples_per_s`` (batch size / median step), ``mean_samples_per_s``, ``batch_size``,
``device``, ``precision``, ``peak_device_bytes`` (``torch.cuda.max_memory_allocated`` since
the start of training; peak RSS of the process on CPU), ``peak_reserved_bytes`` (CUDA only),
``finished``.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch


class StepStats(pl.Callback):
    """path: the JSON file to write; warmup: steps not timed; write_every: steps between writes."""

    def __init__(self, path: str | os.PathLike, warmup: int = 10, write_every: int = 10) -> None:
        self.path = Path(path)
        self.warmup = int(warmup)
        self.write_every = max(1, int(write_every))
        self.steps = 0
        self.batch_size = 0
        self.times: list[float] = []
        self._last: float | None = None
        self._device = torch.device("cpu")
        self._precision = ""

    def _cuda(self) -> bool:
        return self._device.type == "cuda"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._device = pl_module.device
        self._precision = str(trainer.precision)
        if self._cuda():
            torch.cuda.synchronize(self._device)
            torch.cuda.reset_peak_memory_stats(self._device)
        self._last = None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._cuda():
            torch.cuda.synchronize(self._device)
        now = time.perf_counter()
        self.steps += 1
        labels = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
        if isinstance(labels, torch.Tensor):
            self.batch_size = int(labels.shape[0])
        if self._last is not None and self.steps > self.warmup:
            self.times.append(now - self._last)
        self._last = now
        if self.steps % self.write_every == 0:
            self.write(finished=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write(finished=True)

    def summary(self, finished: bool) -> dict[str, Any]:
        """The numbers so far (what ``write`` puts in the file)."""
        median = statistics.median(self.times) if self.times else None
        mean = statistics.fmean(self.times) if self.times else None
        out: dict[str, Any] = {
            "steps": self.steps,
            "steps_timed": len(self.times),
            "warmup": self.warmup,
            "median_step_s": median,
            "samples_per_s": self.batch_size / median if median else None,
            "mean_samples_per_s": self.batch_size / mean if mean else None,
            "batch_size": self.batch_size,
            "device": str(self._device),
            "precision": self._precision,
            "finished": finished,
        }
        if self._cuda():
            out["device_name"] = torch.cuda.get_device_name(self._device)
            out["peak_device_bytes"] = int(torch.cuda.max_memory_allocated(self._device))
            out["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(self._device))
        else:  # ru_maxrss is KiB on Linux
            out["peak_device_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return out

    def write(self, finished: bool) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.summary(finished), indent=1) + "\n")
        os.replace(tmp, self.path)  # a reader never sees half a file
