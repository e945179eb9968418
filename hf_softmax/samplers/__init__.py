"""Active-class samplers: one file per kind, registered by name.

``build_sampler(cfg, num_classes, metric, seed)`` takes the ``sampler`` config node. Its
rebuild keys (``REBUILD_KEYS``: interval, background, probe_every, ...) belong to the
``IndexRebuild`` callback and are ignored here; the remaining keys are the kind's knobs.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from hf_softmax.samplers.annoy import AnnoySampler
from hf_softmax.samplers.auto import AutoSampler
from hf_softmax.samplers.base import ActiveSet, Sampler
from hf_softmax.samplers.exact import ExactSampler, exact_topk, recall_at_k
from hf_softmax.samplers.faiss import FaissSampler
from hf_softmax.samplers.full import FullSampler
from hf_softmax.samplers.hnsw import HNSWSampler
from hf_softmax.samplers.random import RandomSampler

__all__ = [
    "REBUILD_KEYS",
    "SAMPLERS",
    "ActiveSet",
    "AnnoySampler",
    "AutoSampler",
    "ExactSampler",
    "FaissSampler",
    "FullSampler",
    "HNSWSampler",
    "RandomSampler",
    "Sampler",
    "build_sampler",
    "exact_topk",
    "recall_at_k",
]

SAMPLERS: dict[str, type[Sampler]] = {
    "full": FullSampler,
    "random": RandomSampler,
    "annoy": AnnoySampler,
    "hnsw": HNSWSampler,
    "exact": ExactSampler,
    "faiss": FaissSampler,
    "auto": AutoSampler,
}

REBUILD_KEYS = frozenset(
    {
        "interval",
        "background",
        "probe_every",
        "probe_k",
        "min_recall",
        "adaptive",
        "num_schedule",
        "target_recall",
    }
)
_COMMON = frozenset({"num_classes", "num", "metric", "seed", "self"})
# selection knobs every sampler takes (``Sampler.configure``)
SELECTION_KEYS = frozenset({"random_fraction", "index_after", "correction"})


def build_sampler(cfg: Mapping[str, Any], num_classes: int, metric: str, seed: int = 0) -> Sampler:
    """cfg: the ``sampler`` config node (name, num, rebuild keys, knobs) -> a Sampler."""
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid names: {sorted(SAMPLERS)}")
    cls = SAMPLERS[name]
    num = cfg.pop("num", 1000)
    selection = {k: cfg.pop(k) for k in SELECTION_KEYS if k in cfg}
    knobs = {k: v for k, v in cfg.items() if k not in REBUILD_KEYS}
    valid = set(inspect.signature(cls.__init__).parameters) - _COMMON
    unknown = sorted(set(knobs) - valid)
    if unknown:
        raise ValueError(
            f"sampler {name!r}: unknown config keys {unknown}; valid knobs: "
            f"{sorted(valid | SELECTION_KEYS)}, rebuild keys: {sorted(REBUILD_KEYS)}"
        )
    sampler = cls(num_classes=num_classes, num=num, metric=metric, seed=seed, **knobs)
    return sampler.configure(**selection)
