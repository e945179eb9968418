"""Clear errors for bad configurations, before any work starts (``train.py``, tests).

``check_config(cfg)`` runs the static checks (moved keys, sampler class and knobs, backbone
name, rebuild interval, M, schedule); ``check_config(cfg, num_classes)`` adds the ones that
need N (M <= N, M >= the batch's classes) once the DataModule knows it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hf_softmax.config_keys import check_moved
from hf_softmax.row_update import check_row_momentum, resolve_row_norm
from hf_softmax.samplers import check_sampler_kwargs, sampler_class
from hf_softmax.schedule import SCHEDULES


def _node(cfg: Mapping[str, Any], *path: str) -> Mapping[str, Any]:
    for key in path:
        cfg = (cfg.get(key) if isinstance(cfg, Mapping) else None) or {}
    return cfg


def check_row_rule(classifier: Mapping[str, Any], head: Mapping[str, Any]) -> None:
    """``classifier.row_norm`` / ``row_momentum`` (``hf_softmax.row_update``) for the head."""
    linear = str(head.get("_target_", "")).endswith("LinearHead")
    resolve_row_norm(classifier.get("row_norm"), "ip" if linear else "cosine", lambda: 1.0)
    check_row_momentum(str(classifier.get("row_momentum", "lazy")))


def check_config(cfg: Mapping[str, Any], num_classes: int | None = None) -> None:
    """Raise ValueError naming the key and what was expected.

    Without ``num_classes`` (before the data is prepared) only the static checks run.
    """
    check_moved(cfg)
    sampler = cfg["sampler"]
    cls = sampler_class(sampler)  # "unknown sampler ...; valid names: [...]"
    check_sampler_kwargs(cls, {str(k) for k in sampler if k != "name"})
    from hf_softmax.backbones import BACKBONES

    model = cfg["model"]
    backbone = model.get("name")
    if str(model.get("_target_", "")).endswith("build_backbone") and backbone not in BACKBONES:
        raise ValueError(
            f"unknown backbone {backbone!r} (model=...); valid names: {sorted(BACKBONES)}"
        )
    rebuild = _node(cfg, "callbacks", "index_rebuild")
    interval = rebuild.get("interval", 1)
    if interval is None or int(interval) < 1:
        raise ValueError(
            f"callbacks.index_rebuild.interval must be >= 1 (steps between rebuilds), got "
            f"{interval}"
        )
    check_row_rule(_node(cfg, "classifier"), _node(cfg, "head"))
    num = sampler.get("num")
    if num is None or int(num) < 1:
        raise ValueError(f"sampler.num (M, active classes per step) must be >= 1, got {num}")
    schedule = _node(cfg, "scheduler").get("schedule", "cosine")
    if schedule not in SCHEDULES:
        raise ValueError(f"scheduler.schedule must be one of {SCHEDULES}, got {schedule!r}")
    if num_classes is None or cls.dense:
        return
    if int(num) > num_classes:
        raise ValueError(
            f"sampler.num = {num} exceeds the number of classes N = {num_classes} of the data "
            f"(data.path / data.demo_kwargs); choose sampler.num <= {num_classes}"
        )
    batch = _node(cfg, "data").get("batch_size")
    if batch:
        need = min(int(batch), num_classes)
        if int(num) < need:
            raise ValueError(
                f"sampler.num = {num} is smaller than data.batch_size = {batch}: a batch can hold "
                f"{need} distinct classes and all of them must be active; choose sampler.num "
                f">= {need}"
            )
