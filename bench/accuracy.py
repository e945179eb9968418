"""Accuracy retention: sampled softmax vs full softmax on a task where hard negatives decide.

Task (feature level, hierarchical): N classes in families of ``family`` look-alikes. Each
family has a unit centre; each class adds a private offset of norm ``fine``; an input is
its class centre plus isotropic noise (``noise`` = expected noise norm) in ``input_dim``
dimensions. Telling families apart is easy; telling the classes *within* a family apart is
what the model has to learn, and the only negatives that teach it are the siblings — the
classes whose rows lie nearest to the feature. Random sampling at M/N = 1% sees a sibling
as a negative in ~1% of the steps; an index sampler sees all of them.

Model: a trainable projection (Linear, input_dim -> dim) + the real ``SampledClassifier``
(linear head) with each sampler; rebuilds through the real ``IndexMaintainer``
(blocking, every ``interval`` steps, so the wall time includes them). ``full`` is the dense
``SampledClassifier`` (W an nn.Parameter) trained by ``torch.optim.SGD`` with momentum.
Same steps, batch, learning rate and data order for every run. Top-1 = argmax over all N on
held-out samples (``SampledClassifier.predict``).

    python -m bench.accuracy --quick
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

# Before torch loads OpenMP (see bench.head_speed).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.accuracy_report import render, summary  # noqa: E402
from bench.common import RunClock, sampler_config, setup_run, write_json  # noqa: E402
from hf_softmax.classifier import SampledClassifier  # noqa: E402
from hf_softmax.dense_classifier import DenseClassifier  # noqa: E402
from hf_softmax.heads import build_head  # noqa: E402
from hf_softmax.index_maintainer import IndexMaintainer  # noqa: E402
from hf_softmax.row_update import auto_row_norm, resolve_row_norm  # noqa: E402
from hf_softmax.samplers import build_sampler  # noqa: E402

log = logging.getLogger("bench.accuracy")

FRACTIONS = (0.005, 0.01, 0.05)
SAMPLERS = ("full", "random", "annoy", "hnsw")
CHOICES = (*SAMPLERS, "exact", "auto")


@dataclass
class TaskConfig:
    num_classes: int = 10_000
    family: int = 10
    input_dim: int = 64
    dim: int = 64
    fine: float = 0.5
    noise: float = 0.5
    batch: int = 25
    steps: int = 2000
    lr: float = 0.1
    interval: int = 20
    eval_every: int = 250
    test_size: int = 5000
    head: str = "cosface"
    scale: float = 30.0
    margin: float = 0.2
    seed: int = 0
    query: str = "feature"  # index samplers: feature (per-feature query) | label (class table)
    # how the sampled rows move (hf_softmax.row_update), as train.py's defaults
    row_norm: Any = "auto"
    row_momentum: str = "immediate"
    knobs: dict[str, Any] = field(default_factory=dict)  # extra knobs of the index samplers


@dataclass
class RunResult:
    sampler: str
    fraction: float | None
    num: int
    top1: float
    family_top1: float
    wall_s: float
    rebuild_s: float
    curve: list[dict[str, float]] = field(default_factory=list)  # step, seconds, top1
    knobs: dict[str, Any] = field(default_factory=dict)


class Task:
    """Class centres (N, input_dim) and a sampler of (inputs, labels) batches."""

    def __init__(self, cfg: TaskConfig) -> None:
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        n_fam = math.ceil(cfg.num_classes / cfg.family)
        fam = torch.randn(n_fam, cfg.input_dim, generator=g)
        fam = fam / fam.norm(dim=1, keepdim=True)
        off = torch.randn(cfg.num_classes, cfg.input_dim, generator=g)
        off = off / off.norm(dim=1, keepdim=True)
        fam_of = torch.arange(cfg.num_classes) // cfg.family
        self.centres = fam[fam_of] + cfg.fine * off  # (N, input_dim)
        tg = torch.Generator().manual_seed(cfg.seed + 1)
        self.test_labels = torch.randint(0, cfg.num_classes, (cfg.test_size,), generator=tg)
        self.test_inputs = self.sample(self.test_labels, tg)

    def sample(self, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """labels (B,) -> inputs (B, input_dim)."""
        c = self.centres[labels]
        scale = self.cfg.noise / math.sqrt(self.cfg.input_dim)
        return c + scale * torch.randn(c.shape, generator=gen)


def train_one(task: Task, sampler_name: str, fraction: float | None) -> RunResult:
    cfg = task.cfg
    n = cfg.num_classes
    num = n if fraction is None else max(int(round(fraction * n)), 2 * cfg.batch)
    torch.manual_seed(cfg.seed)
    proj = nn.Linear(cfg.input_dim, cfg.dim)
    head = build_head(cfg.head, scale=cfg.scale, margin=cfg.margin)
    # One build thread: the 25-sample queries gain nothing from threads, and a lean hnsw
    # build (m=8, ef_construction=40) keeps 100 rebuilds per run affordable.
    knobs: dict[str, Any] = {"n_jobs": 1} if sampler_name == "annoy" else {}
    if sampler_name == "hnsw":
        knobs = {"num_threads": 1, "m": 8, "ef_construction": 40}
    if sampler_name not in ("full", "random"):
        knobs["query"] = cfg.query
        knobs.update(cfg.knobs)
    sampler = build_sampler(sampler_config(sampler_name, num, **knobs), n, head.metric, cfg.seed)
    kind = DenseClassifier if sampler.dense else SampledClassifier
    if sampler.dense:  # full: W an nn.Parameter under torch SGD, the reference
        clf = kind(n, cfg.dim, head, sampler, seed=cfg.seed)
    else:
        auto = lambda: auto_row_norm(cfg.scale, cfg.lr, 0.9, cfg.batch)  # noqa: E731
        clf = kind(n, cfg.dim, head, sampler, seed=cfg.seed, momentum=0.9, weight_decay=5e-4,
                   row_norm=resolve_row_norm(cfg.row_norm, head.metric, auto),
                   row_momentum=cfg.row_momentum)  # fmt: skip
    params = list(proj.parameters()) + (list(clf.parameters()) if sampler.dense else [])
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    # full rebuilds: an hnsw refresh of ~20% of the rows costs more than a build (see the
    # index-cost table)
    maintainer = IndexMaintainer(clf, interval=cfg.interval, background=False, probe_every=0,
                                 refresh=False)  # fmt: skip
    gen = torch.Generator().manual_seed(cfg.seed + 2)  # same data order for every run
    curve: list[dict[str, float]] = []
    t0 = time.perf_counter()
    eval_s = 0.0
    maintainer.start(0)  # no-op without an index (full, random)
    for step in range(cfg.steps):
        maintainer.on_step_start(step)
        labels = torch.randint(0, n, (cfg.batch,), generator=gen)
        x = task.sample(labels, gen)
        out = clf(proj(x), labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        clf.step(out, cfg.lr)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            te = time.perf_counter()
            top1, _ = evaluate(task, proj, clf)
            eval_s += time.perf_counter() - te
            curve.append(
                {"step": step + 1, "seconds": time.perf_counter() - t0 - eval_s, "top1": top1}
            )
    wall = time.perf_counter() - t0 - eval_s
    top1, fam1 = evaluate(task, proj, clf)
    rebuild_s = sum(r["seconds"] for r in maintainer.records())
    res = RunResult(sampler_name, fraction, num, top1, fam1, wall, rebuild_s, curve, knobs)
    log.info(
        "%s M=%d: top1 %.4f (family %.4f) in %.1fs (rebuilds %.1fs)",
        sampler_name,
        num,
        top1,
        fam1,
        wall,
        rebuild_s,
    )
    return res


@torch.no_grad()
def evaluate(
    task: Task, proj: nn.Module, clf: SampledClassifier | DenseClassifier
) -> tuple[float, float]:
    """Held-out top-1 (argmax over all N) and the top-1 of the family only."""
    feats = proj(task.test_inputs)
    pred = clf.predict(feats)
    top1 = (pred == task.test_labels).float().mean().item()
    fam = task.cfg.family
    fam1 = ((pred // fam) == (task.test_labels // fam)).float().mean().item()
    return top1, fam1


def run(
    quick: bool = False,
    samplers: tuple[str, ...] = SAMPLERS,
    fractions: tuple[float, ...] = FRACTIONS,
    **overrides: Any,
) -> dict[str, Any]:
    cfg = TaskConfig() if quick else TaskConfig(num_classes=100_000, batch=250, steps=4000)
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    clock = RunClock()
    task = Task(cfg)
    results: list[RunResult] = []
    if "full" in samplers:
        results.append(train_one(task, "full", None))
    for frac in fractions:
        for s in samplers:
            if s != "full":
                results.append(train_one(task, s, frac))
    return {
        "results": [asdict(r) for r in results],
        "meta": clock.meta(quick=quick, task=asdict(cfg)),
    }


def parse_knob(text: str) -> tuple[str, Any]:
    """``key=value`` -> (key, value as YAML reads it: numbers, null, strings)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--knob expects KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N = 1e4")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=CHOICES)
    p.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    p.add_argument("--n", type=int, dest="num_classes")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--fine", type=float)
    p.add_argument("--noise", type=float)
    p.add_argument("--head", choices=["linear", "cosface", "arcface"])
    p.add_argument("--interval", type=int)
    p.add_argument("--scale", type=float)
    p.add_argument("--margin", type=float)
    p.add_argument("--threads", type=int)
    p.add_argument("--query", choices=["feature", "label"], help="index samplers' selection")
    p.add_argument("--row-norm", help="sampled rows' norm: auto (default), null or a number")
    p.add_argument("--row-momentum", choices=["immediate", "lazy"])
    p.add_argument(
        "--knob",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a knob of the index samplers, e.g. random_fraction=0.5 (repeatable)",
    )
    p.add_argument("--out", default="accuracy")
    args = p.parse_args(argv)
    setup_run(args.threads)
    data = run(
        quick=args.quick,
        samplers=tuple(args.samplers),
        fractions=tuple(args.fractions),
        num_classes=args.num_classes,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        fine=args.fine,
        noise=args.noise,
        head=args.head,
        interval=args.interval,
        scale=args.scale,
        margin=args.margin,
        query=args.query,
        row_norm=args.row_norm,
        row_momentum=args.row_momentum,
        knobs=dict(parse_knob(k) for k in args.knob) or None,
    )
    write_json(args.out, data)
    print(render(data))
    print(summary(data))
    return data


if __name__ == "__main__":
    main()
