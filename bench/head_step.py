"""One classifier-head training step for the head-speed benchmark (``bench.head_speed``).

``HeadBench`` holds the real classifier for one (sampler, N, D) and times its step: select,
gather, forward/backward, update. Samplers: ``full`` (W an ``nn.Parameter`` over all N
classes + ``torch.optim.SGD`` with momentum, i.e. the real ``DenseClassifier`` with the
``full`` sampler), ``random``, ``annoy``, ``hnsw``, ``exact``, ``faiss`` (the real
samplers behind the real ``SampledClassifier`` with its sparse update), and ``dense-update``:
the random sampler's M rows, but W is one ``nn.Parameter`` whose dense (N, D) gradient and
momentum torch SGD updates over all N rows every step, as Partial FC v2 does.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from bench.common import Stopwatch, family_rows, features_near, sampler_config, sync
from hf_softmax.classifier import SampledClassifier
from hf_softmax.dense_classifier import DenseClassifier
from hf_softmax.heads import build_head
from hf_softmax.output import ClassifierOutput
from hf_softmax.samplers import build_sampler

SAMPLERS = ("full", "random", "annoy", "hnsw", "exact")  # the default grid's
DENSE_UPDATE = "dense-update"  # random rows, dense N x D optimizer update (Partial FC v2)
VARIANTS = (*SAMPLERS, "faiss", DENSE_UPDATE)


def kind_of(variant: str) -> str:
    """A variant's sampler kind: ``faiss.hnsw`` -> ``faiss`` (a label after the dot lets one
    run time a kind twice with different ``--knobs``, e.g. ``faiss.hnsw:index=hnsw``)."""
    return variant.split(".", 1)[0]


def check_variant(variant: str) -> str:
    """argparse type of ``--samplers``: KIND or KIND.LABEL with KIND in ``VARIANTS``."""
    if kind_of(variant) not in VARIANTS:
        raise argparse.ArgumentTypeError(
            f"{variant!r}: expected SAMPLER or SAMPLER.LABEL with SAMPLER in {VARIANTS}"
        )
    return variant


LR = 0.1


@dataclass
class StepResult:
    """One (sampler, N, D) point: median step seconds and where the time goes."""

    sampler: str
    num_classes: int
    dim: int
    batch: int
    num: int
    step_s: float
    steps: int
    splits: dict[str, float] = field(default_factory=dict)
    build_s: float | None = None
    state_bytes: int = 0
    index_bytes: int | None = None
    peak_host_bytes: int = 0
    peak_cuda_bytes: int = 0
    offload: bool = False
    knobs: dict[str, Any] = field(default_factory=dict)
    vs_full: float | None = None
    vs_random: float | None = None
    note: str = ""


def estimated_bytes(variant: str, n: int, d: int) -> int:
    """Rough peak host bytes of one configuration (W, momentum, grads, index build)."""
    sampler = kind_of(variant)
    row = n * d * 4
    if sampler in ("full", DENSE_UPDATE):
        return 3 * row  # weight, grad, momentum
    base = 2 * row  # weight + momentum
    if sampler == "annoy":
        # snapshot copy + build_index's Python-list conversion (~32 bytes per float) + index
        return base + row + 8 * row + 2 * row
    if sampler == "hnsw":
        return base + row + row + n * 16 * 8
    if sampler == "exact":
        return base + row  # the index is a copy of W
    if sampler == "faiss":  # ivf-flat: a copy of the rows in the inverted lists + ids
        return base + row + n * 8
    return base


def hnsw_quick_knobs(n: int, quick: bool) -> dict[str, Any]:
    """Quick mode builds hnsw at N >= 10^6 lean (m=8, ef_construction=40; ef unchanged): the
    default build (m=16, ef_construction=100) takes minutes there on 2 cores."""
    return {"m": 8, "ef_construction": 40} if quick and n >= 1_000_000 else {}


class DenseUpdateClassifier(nn.Module):
    """Partial FC v2's update on the ``random`` sampler's active set.

    W (N, D) is one ``nn.Parameter``: the M rows are gathered inside autograd, so backward
    writes a dense (N, D) gradient (zeros outside A) and ``torch.optim.SGD`` with momentum and
    weight decay moves all N rows and their momentum every step: O(N * D) per step, the cost
    the lazy sparse update avoids. Same interface as ``SampledClassifier`` for ``HeadBench``.
    """

    def __init__(self, sampler, head: nn.Module, weight: torch.Tensor) -> None:
        super().__init__()
        self.sampler = sampler
        self.head = head
        self.weight = nn.Parameter(weight.detach())

    def place(self, device: torch.device | str) -> None:
        self.to(device)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> ClassifierOutput:
        """features (B, D), labels (B,) -> loss over the M active rows (logits (B, M))."""
        active = self.sampler.select(features.detach(), labels)
        rows = self.weight.index_select(0, active.ids.to(self.weight.device))  # (M, D)
        targets = active.targets.to(features.device, non_blocking=True)
        logits = self.head(features, rows, targets)
        loss = F.cross_entropy(logits, targets)
        return ClassifierOutput(loss, logits, targets, active, accuracy=loss.new_zeros(()))

    def step(self, out: ClassifierOutput, lr: float) -> None:  # the torch optimizer owns W
        pass


class HeadBench:
    """The real classifier for one (sampler, N, D) and its timed training step.

    ``shared``: (W, momentum) storage to install instead of the classifier's own, so the
    sparse samplers of one grid point can live side by side (timed in alternating rounds)
    without one N x D copy each; what the benchmark measures (time) does not depend on the
    values in W. ``weight``: initial W (N, D) used in place (its device and pinning kept),
    e.g. made on the GPU; default: family rows generated on the host.
    """

    def __init__(
        self,
        sampler_name: str,
        n: int,
        d: int,
        batch: int,
        num: int,
        head: str,
        device: str,
        features: str,
        offload: bool,
        knobs: dict[str, Any],
        shared: tuple[torch.Tensor, torch.Tensor] | None = None,
        seed: int = 0,
        pool: int = 8,
        weight: torch.Tensor | None = None,
    ) -> None:
        self.name = sampler_name
        self.device = torch.device(device)
        self.knobs = knobs
        head_module = build_head(head)
        dense_update = kind_of(sampler_name) == DENSE_UPDATE
        cfg = sampler_config("random" if dense_update else kind_of(sampler_name), num, **knobs)
        sampler = build_sampler(cfg, n, head_module.metric, seed)
        if dense_update:
            if weight is None:
                weight = torch.from_numpy(family_rows(n, d, seed=seed, scale=0.05))
            self.clf = DenseUpdateClassifier(sampler, head_module, weight)
        elif sampler.dense:
            self.clf = DenseClassifier(n, d, head_module, sampler, seed=seed, weight=weight)
            if weight is None:  # W := class vectors in families (in place)
                family_rows(n, d, seed=seed, scale=0.05, out=self.clf.weight.detach().numpy())
        else:
            self.clf = SampledClassifier(
                n, d, head_module, sampler, offload=offload, seed=seed, weight=weight
            )
            if weight is not None:
                pass  # W given: used as is
            elif shared is not None:
                self.clf.store.weight, self.clf.store.momentum_buffer = shared
            else:
                # W := class vectors in families (fills the classifier's own storage in place).
                family_rows(n, d, seed=seed, scale=0.05, out=self.clf.weight.detach().numpy())
        self.clf.place(self.device)
        self.opt = (
            torch.optim.SGD(self.clf.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
            if isinstance(self.clf, (DenseClassifier, DenseUpdateClassifier))
            else None
        )
        rng = np.random.default_rng(seed + 1)
        w_all = self.clf.weight.detach()
        self.batches = []
        for _ in range(pool):
            labels = rng.integers(0, n, batch)
            if features == "clustered":
                # only the labels' rows leave W's device (W may be 10^7 rows on a GPU)
                w = w_all[torch.from_numpy(labels).to(w_all.device)].cpu().numpy()  # (B, D)
                feats = features_near(w, np.arange(batch), noise=0.5, rng=rng)
            else:
                feats = rng.standard_normal((batch, d), dtype=np.float32)
            self.batches.append(
                (torch.from_numpy(feats).to(self.device), torch.from_numpy(labels).to(self.device))
            )
        self._i = 0
        self.per_round = 1
        self.sw = Stopwatch()
        self.times: list[float] = []
        # instrument the real select: its share of the forward is reported separately
        real_select = sampler.select

        def timed_select(f: torch.Tensor, y: torch.Tensor):
            t0 = time.perf_counter()
            out = real_select(f, y)
            self.sw.splits.setdefault("select", []).append(time.perf_counter() - t0)
            return out

        sampler.select = timed_select  # type: ignore[method-assign]

    def shared_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.clf.store.weight, self.clf.store.momentum_buffer

    def build(self) -> float | None:
        sampler = self.clf.sampler
        if not sampler.needs_index:
            return None
        t0 = time.perf_counter()
        # No training runs during this build, so W itself serves as the snapshot (no copy).
        weights = self.clf.weight.detach().cpu().numpy()
        sampler.swap(sampler.build_index(weights))
        return time.perf_counter() - t0

    def step(self, record: bool = True) -> None:
        feats, labels = self.batches[self._i % len(self.batches)]
        self._i += 1
        sw, dev = self.sw, self.device.type
        f = feats.detach().requires_grad_(True)  # stands for the backbone output
        t0 = time.perf_counter()
        out = self.clf(f, labels)
        sync(dev)
        t1 = time.perf_counter()
        out.loss.backward()
        sync(dev)
        t2 = time.perf_counter()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=False)
        else:
            self.clf.step(out, LR)
        sync(dev)
        t3 = time.perf_counter()
        sel = sw.splits["select"].pop() if not record else sw.splits["select"][-1]
        if not record:
            return
        self.times.append(t3 - t0)
        sw.splits.setdefault("gather+forward", []).append(t1 - t0 - sel)
        sw.splits.setdefault("backward", []).append(t2 - t1)
        sw.splits.setdefault("update", []).append(t3 - t2)


def state_bytes(sampler: str, n: int, d: int) -> int:
    """W + momentum (+ gradient for the dense baseline and dense-update), float32."""
    return (3 if kind_of(sampler) in ("full", DENSE_UPDATE) else 2) * n * d * 4


def parse_knobs(items: list[str], parser: argparse.ArgumentParser) -> dict[str, dict[str, Any]]:
    """["faiss:nprobe=8", ...] -> {"faiss": {"nprobe": 8}} (values parsed as YAML scalars);
    SAMPLER may be a labelled variant (``faiss.hnsw:index=hnsw``)."""
    knobs: dict[str, dict[str, Any]] = {}
    for item in items:
        sampler, sep, rest = item.partition(":")
        key, eq, value = rest.partition("=")
        if not sep or not eq or kind_of(sampler) not in VARIANTS:
            parser.error(f"--knobs {item!r}: expected SAMPLER:KEY=VALUE with SAMPLER in {VARIANTS}")
        knobs.setdefault(sampler, {})[key] = yaml.safe_load(value)
    return knobs
