"""Active-class samplers: one file per kind (``hf_softmax/samplers/<name>.py``).

Training builds a sampler from ``conf/sampler/<name>.yaml``: ``_target_`` names the class,
``_partial_: true`` makes Hydra return a partial over M, the selection knobs and the kind's
knobs, and the partial is called with ``num_classes``, ``metric`` and ``seed`` once N is known
(``hf_softmax.build``). Adding a sampler is one file here + one YAML: nothing is registered.

``build_sampler(cfg, num_classes, metric, seed)`` is the same from a plain mapping, for tests
and benchmarks: ``{"name": "annoy", "num": 1000, ...}`` (the class ``name`` of the module
``hf_softmax.samplers.<name>``) or a YAML node with ``_target_``.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Mapping
from typing import Any

from hf_softmax.samplers.active_set import ActiveSet
from hf_softmax.samplers.annoy import AnnoySampler
from hf_softmax.samplers.auto import AutoSampler
from hf_softmax.samplers.base import Sampler
from hf_softmax.samplers.exact import ExactSampler, exact_topk, recall_at_k
from hf_softmax.samplers.faiss import FaissSampler
from hf_softmax.samplers.full import FullSampler
from hf_softmax.samplers.hnsw import HNSWSampler
from hf_softmax.samplers.random import RandomSampler

__all__ = [
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
    "check_sampler_kwargs",
    "exact_topk",
    "recall_at_k",
    "sampler_class",
    "sampler_names",
]

# given when N is known, never in a sampler's YAML
GIVEN = frozenset({"self", "num_classes", "metric", "seed"})
# modules the samplers use, not kinds of sampler
_SHARED = frozenset({"base", "active_set", "state", "tuning", "race", "build_files"})
_HYDRA_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})


def sampler_names() -> list[str]:
    """The sampler kinds: the modules of this package (the shared parts, ``_SHARED``, aside)."""
    here = __path__  # type: ignore[name-defined]  # this package's folder
    return sorted(m.name for m in pkgutil.iter_modules(here) if m.name not in _SHARED)


def _class_by_name(name: str) -> type[Sampler]:
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ImportError as exc:
        raise ValueError(f"unknown sampler {name!r}; valid names: {sampler_names()}") from exc
    for value in vars(module).values():
        if inspect.isclass(value) and issubclass(value, Sampler) and value.name == name:
            return value
    raise ValueError(f"{module.__file__}: no Sampler subclass with name = {name!r}")


def sampler_class(cfg: Mapping[str, Any]) -> type[Sampler]:
    """The Sampler class of a ``sampler`` node: its ``_target_``, else its ``name``."""
    target = cfg.get("_target_")
    if target is None:
        return _class_by_name(str(cfg.get("name")))
    module_name, _, attr = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(
            f"unknown sampler {target!r} (sampler._target_; sampler=...): cannot import it; "
            f"valid names: {sampler_names()}"
        ) from exc
    if not (inspect.isclass(cls) and issubclass(cls, Sampler)):
        raise ValueError(f"sampler._target_ {target!r} is not a Sampler subclass")
    return cls


def _parameters(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break  # this constructor passes nothing further up
    return names - GIVEN


def check_sampler_kwargs(cls: type[Sampler], keys: list[str] | set[str]) -> None:
    """Raise ValueError naming the keys ``cls`` does not take (and the ones it does)."""
    valid = _parameters(cls)
    unknown = sorted(set(keys) - valid - _HYDRA_KEYS)
    if unknown:
        raise ValueError(
            f"sampler {cls.name!r}: unknown config keys {unknown}; valid knobs: {sorted(valid)} "
            "(rebuild keys live under callbacks.index_rebuild, the M schedule under "
            "callbacks.m_schedule)"
        )


def build_sampler(cfg: Mapping[str, Any], num_classes: int, metric: str, seed: int = 0) -> Sampler:
    """cfg: a ``sampler`` node (``_target_`` or ``name``, num, knobs) -> a Sampler over N."""
    cfg = dict(cfg)
    cls = sampler_class(cfg)
    kwargs = {k: v for k, v in cfg.items() if k not in _HYDRA_KEYS and k != "name"}
    check_sampler_kwargs(cls, kwargs)
    return cls(num_classes=num_classes, metric=metric, seed=seed, **kwargs)
