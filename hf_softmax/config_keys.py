"""Config keys that moved in the objects-in redesign, and the mapping of old configs.

Old key -> new key (``MOVED``). A moved key given on the command line
(``python train.py sampler.interval=50``) or left in a composed config (a user's experiment
YAML) stops with ``MovedKeyError`` naming the new key; a config saved in an old checkpoint
(``hyper_parameters.cfg``) is rewritten into the new shape by ``upgrade_config`` (evaluate.py,
``hf_softmax.build.module_from_checkpoint``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

REBUILD = ("interval", "background", "probe_every", "probe_k", "min_recall", "adaptive")
SCHEDULE = ("warmup_steps", "warmup_start_factor", "milestones", "gamma", "min_lr_factor")

MOVED: dict[str, str] = {
    **{f"sampler.{k}": f"callbacks.index_rebuild.{k}" for k in (*REBUILD, "target_recall")},
    "sampler.num_schedule": "callbacks.m_schedule.schedule",
    **{f"optim.{k}": f"scheduler.{k}" for k in (*SCHEDULE, "total_steps")},
    "optim.schedule": "scheduler",  # a group now: scheduler=cosine|step|constant
    "optim.grad_clip": "grad_clip",
    "sampler.name": "sampler",  # the group choice (sampler=annoy) names the sampler
    "head.name": "head",
}
GROUPS = frozenset({"scheduler", "sampler", "head"})  # new "keys" that are group choices

HEADS = {
    "linear": "hf_softmax.heads.LinearHead",
    "cosface": "hf_softmax.heads.CosFaceHead",
    "arcface": "hf_softmax.heads.ArcFaceHead",
}


class MovedKeyError(ValueError):
    """A config key that moved; the message names the new key."""


def _hint(old: str, value: str | None) -> str:
    new = MOVED[old]
    shown = "..." if value is None else value
    use = f"{new}={shown}" if new not in GROUPS else f"{new}=<{new.split('.')[-1]} name>"
    if old == "optim.schedule" and value is not None:
        use = f"scheduler={value}"
    return f"{old} moved to {new}: use {use}"


def check_overrides(overrides: Iterable[str]) -> None:
    """Command-line overrides (``key=value``, ``+key=``, ``~key``) -> MovedKeyError on old keys.

    Hydra rejects an unknown key before ``main`` runs, with a message that does not say where
    the key went; entry points call this on ``sys.argv[1:]`` first.
    """
    for arg in overrides:
        if arg.startswith("-") or ("=" not in arg and not arg.startswith("~")):
            continue  # flags (-m, --multirun, --config-name ...) and their values
        key, _, value = arg.lstrip("+~").partition("=")
        if key in MOVED:
            raise MovedKeyError(_hint(key, value or None))


def check_moved(cfg: Mapping[str, Any]) -> None:
    """A composed config still holding a moved key (e.g. an old experiment YAML)."""
    for old in MOVED:
        group, key = old.split(".")
        node = cfg.get(group)
        if isinstance(node, Mapping) and key in node:
            if old in ("sampler.name", "head.name") and "_target_" not in node:
                continue  # an old-shape node: upgrade_config's business
            raise MovedKeyError(_hint(old, None) + " (found in the composed config)")


def upgrade_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A resolved train config of any age (``hyper_parameters.cfg``) -> the current shape.

    Old-shape nodes (sampler/head/model by ``name``, rebuild keys in ``sampler``, schedule
    keys in ``optim``) get their ``_target_`` and move their keys; current configs pass through.
    """
    out = copy.deepcopy(dict(cfg))
    sampler = dict(out.get("sampler") or {})
    if sampler and "_target_" not in sampler:
        from hf_softmax.samplers import sampler_class

        cls = sampler_class(sampler)
        rebuild = dict((out.get("callbacks") or {}).get("index_rebuild") or {})
        for key in (*REBUILD, "target_recall"):
            if key in sampler:
                rebuild.setdefault(key, sampler[key])
        schedule = sampler.pop("num_schedule", rebuild.pop("num_schedule", None))
        for key in (*REBUILD, "target_recall"):
            sampler.pop(key, None)
        sampler.pop("name", None)
        out["sampler"] = {"_target_": f"{cls.__module__}.{cls.__qualname__}", "_partial_": True,
                          **sampler}  # fmt: skip
        callbacks = dict(out.get("callbacks") or {})
        if rebuild:
            callbacks["index_rebuild"] = rebuild
        callbacks.setdefault(
            "m_schedule", {"_target_": "callbacks.m_schedule.MSchedule", "schedule": schedule}
        )
        out["callbacks"] = callbacks
    head = dict(out.get("head") or {})
    if head and "_target_" not in head:
        name = head.pop("name", "linear")
        if name not in HEADS:
            raise ValueError(f"head.name={name!r} in a saved config; valid names: {sorted(HEADS)}")
        out["head"] = {"_target_": HEADS[name], **head}
    model = dict(out.get("model") or {})
    if model and "_target_" not in model:
        out["model"] = {"_target_": "hf_softmax.backbones.build_backbone", **model}
    optim = dict(out.get("optim") or {})
    if optim and "_target_" not in optim:
        moved = {k: optim.pop(k) for k in (*SCHEDULE, "total_steps", "schedule") if k in optim}
        out.setdefault("grad_clip", optim.pop("grad_clip", None))
        out["optim"] = {"_target_": "torch.optim.SGD", "_partial_": True, **optim}
        out.setdefault(
            "scheduler",
            {"_target_": "hf_softmax.schedule.warmup_scheduler", "_partial_": True, **moved},
        )
    return out
