"""The classifier of a train config: ``SampledClassifier`` or, for ``sampler=full``,
``DenseClassifier`` (``build_classifier``)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from torch import nn

from hf_softmax.classifier import SampledClassifier
from hf_softmax.dense_classifier import DenseClassifier
from hf_softmax.heads import MarginHead
from hf_softmax.samplers import SAMPLERS, Sampler, build_sampler


def use_sharded(cfg: Mapping[str, Any]) -> bool:
    """``classifier.sharded``: true | false | "auto" (default): auto = the trainer's strategy
    is a DDP strategy (``trainer=ddp``), where the classifier is split by class over ranks."""
    value = (cfg.get("classifier") or {}).get("sharded", "auto")
    if isinstance(value, str) and value.lower() == "auto":
        strategy = (cfg.get("trainer") or {}).get("strategy", "")
        return isinstance(strategy, str) and strategy.startswith("ddp")
    if isinstance(value, str):
        return value.lower() in ("true", "1", "yes")
    return bool(value)


def sampler_from_config(
    cfg: Mapping[str, Any], num_classes: int, metric: str, seed: int, num: int | None = None
) -> Sampler:
    """The ``sampler`` config node -> its Sampler over ``num_classes`` (with M = ``num`` when
    given); ``functools.partial(sampler_from_config, cfg)`` is a classifier's factory."""
    return build_sampler({**cfg, "num": cfg["num"] if num is None else num}, num_classes,
                         metric, seed)  # fmt: skip


def build_classifier(
    cfg: Mapping[str, Any], num_classes: int, embedding_dim: int, head: MarginHead, seed: int
) -> nn.Module:
    """cfg: the resolved train config (sampler, optim, classifier, trainer) -> the classifier.

    Sharded (``use_sharded``): rows and sampler are made on first use, once the process
    group exists; otherwise now, so bad sampler knobs fail at construction.
    """
    optim, ccfg, scfg = cfg["optim"], cfg.get("classifier", {}) or {}, dict(cfg["sampler"])
    common = dict(
        num_classes=num_classes,
        embedding_dim=embedding_dim,
        head=head,
        init_std=float(ccfg.get("init_std", 0.01)),
        seed=seed,
    )
    offload = bool(ccfg.get("offload", False))
    if SAMPLERS[scfg["name"]].dense:
        if offload:
            raise ValueError("classifier.offload needs a sampled (non-dense) sampler, got 'full'")
        sampler = sampler_from_config(scfg, num_classes, head.metric, seed)
        return DenseClassifier(sampler=sampler, **common)
    shard = use_sharded(cfg)
    classifier = SampledClassifier(
        sampler=functools.partial(sampler_from_config, scfg),
        num=int(scfg["num"]),
        momentum=float(optim["momentum"]),
        weight_decay=float(optim["weight_decay"]),
        offload=offload,
        shard=shard,
        **common,
    )
    if not shard:  # rows and sampler now (bad knobs fail here); under DDP on first use
        classifier.place("cpu")
    return classifier
