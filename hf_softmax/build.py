"""The construction path: a composed train config -> the objects ``HFSoftmaxModule`` takes.

    backbone  = instantiate(cfg.model)                   # conf/model/*.yaml (_target_)
    head      = instantiate(cfg.head)                    # conf/head/*.yaml
    sampler   = instantiate(cfg.sampler)                 # a partial (conf/sampler, _partial_)
    classifier = build_classifier(N, D, head, sampler, cfg.classifier, cfg.optim, sharded)
    optimizer = instantiate(cfg.optim)                   # partial: called with the parameters
    scheduler = instantiate(cfg.scheduler)               # partial: called with the optimizer
    module = HFSoftmaxModule(backbone, classifier, optimizer, scheduler, ...)

``build_classifier`` is the one place that picks and constructs the classifier.
``module_from_checkpoint`` rebuilds a module from any train.py checkpoint (old ones too:
``config_keys.upgrade_config``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra.utils
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from hf_softmax.classifier import SampledClassifier
from hf_softmax.config_keys import upgrade_config
from hf_softmax.dense_classifier import DenseClassifier
from hf_softmax.heads import MarginHead
from hf_softmax.module import HFSoftmaxModule, resolve_cfg
from hf_softmax.row_update import auto_row_norm, resolve_row_norm
from hf_softmax.samplers import Sampler, sampler_class

SamplerPartial = Callable[..., Sampler]  # (num_classes=, metric=, seed=[, num=]) -> Sampler


def use_sharded(cfg: Mapping[str, Any]) -> bool:
    """``classifier.sharded``: true | false | "auto" (default): auto = the trainer's strategy
    is a DDP strategy (``trainer=ddp``), where the classifier is split by class over the ranks.
    """
    value = (cfg.get("classifier") or {}).get("sharded", "auto")
    if isinstance(value, str) and value.lower() == "auto":
        strategy = (cfg.get("trainer") or {}).get("strategy", "")
        return isinstance(strategy, str) and strategy.startswith("ddp")
    if isinstance(value, str):
        return value.lower() in ("true", "1", "yes")
    return bool(value)


def build_classifier(
    num_classes: int,
    embedding_dim: int,
    head: MarginHead,
    sampler_partial: SamplerPartial,
    classifier_cfg: Mapping[str, Any],
    optim_cfg: Mapping[str, Any],
    sharded: bool,
    seed: int = 0,
    batch_size: int | None = None,
) -> nn.Module:
    """The classifier over N rows of D, with the sampler the partial builds for the head's
    metric: a ``DenseClassifier`` for a dense sampler (``sampler=full``), else a
    ``SampledClassifier`` whose rows follow the optimizer's momentum and weight decay.

    batch_size: the per-process batch, for ``classifier.row_norm: auto``. A config without
    ``row_norm`` / ``row_momentum`` (saved before they existed) keeps the rule it was trained
    with: free rows, lazy momentum.
    sharded: split the rows by class over the DDP ranks; rows and each rank's sampler (over its
    block) are made on first use, once the process group exists. Otherwise they are made now,
    so bad sampler knobs fail at construction.
    """
    common = dict(
        num_classes=int(num_classes),
        embedding_dim=int(embedding_dim),
        head=head,
        init_std=float(classifier_cfg.get("init_std", 0.01)),
        seed=int(seed),
    )
    offload = bool(classifier_cfg.get("offload", False))
    if sampler_class(_target_of(sampler_partial)).dense:
        if offload:
            raise ValueError("classifier.offload needs a sampled (non-dense) sampler, got 'full'")
        sampler = sampler_partial(num_classes=int(num_classes), metric=head.metric, seed=int(seed))
        dense_norm = classifier_cfg.get("row_norm")
        dense_norm = None if dense_norm == "auto" else dense_norm  # auto: the plain reference
        return DenseClassifier(sampler=sampler, row_norm=dense_norm, **common)
    classifier = SampledClassifier(
        sampler=sampler_partial,  # called with (num_classes=, metric=, seed=, num=) per shard
        num=int(_keywords(sampler_partial)["num"]),
        momentum=float(optim_cfg.get("momentum", 0.0)),
        weight_decay=float(optim_cfg.get("weight_decay", 0.0)),
        offload=offload,
        prefetch=classifier_cfg.get("prefetch", "auto"),
        row_norm=resolve_row_norm(
            classifier_cfg.get("row_norm"),
            head.metric,
            lambda: auto_row_norm(
                float(getattr(head, "scale", 1.0)),
                float(optim_cfg.get("lr", 0.1)),
                float(optim_cfg.get("momentum", 0.0)),
                int(batch_size or 1),
            ),
        ),  # fmt: skip
        row_momentum=str(classifier_cfg.get("row_momentum", "lazy")),
        shard=bool(sharded),
        **common,
    )
    if not sharded:
        classifier.place("cpu")
    return classifier


def _keywords(partial: SamplerPartial) -> dict[str, Any]:
    return dict(partial.keywords) if isinstance(partial, functools.partial) else {}


def _target_of(partial: SamplerPartial) -> dict[str, str]:
    func = partial.func if isinstance(partial, functools.partial) else partial
    return {"_target_": f"{func.__module__}.{func.__qualname__}"}


def build_module(cfg: Mapping[str, Any] | DictConfig, num_classes: int) -> HFSoftmaxModule:
    """A composed (or saved) train config and N -> the module, its parts built from ``cfg``."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    plain = resolve_cfg(node)
    seed = int(plain.get("seed", 0) or 0)
    backbone = hydra.utils.instantiate(plain["model"], _convert_="all")
    head = hydra.utils.instantiate(plain["head"])
    sampler_partial = hydra.utils.instantiate(plain["sampler"], _convert_="all")
    classifier_cfg = plain.get("classifier") or {}
    classifier = build_classifier(
        num_classes,
        int(plain["model"]["embedding_dim"]),
        head,
        sampler_partial,
        classifier_cfg,
        plain["optim"],
        use_sharded(plain),
        seed,
        batch_size=(plain.get("data") or {}).get("batch_size"),
    )
    vcfg = plain.get("validation") or {}
    flip = vcfg.get("flip")  # null: follow the training data (no flips: no flip TTA)
    return HFSoftmaxModule(
        backbone,
        classifier,
        hydra.utils.instantiate(plain["optim"], _convert_="all"),
        hydra.utils.instantiate(plain["scheduler"], _convert_="all"),
        seed=seed,
        grad_clip=plain.get("grad_clip"),
        skip_nonfinite=bool(plain.get("skip_nonfinite", False)),
        val_flip=bool((plain.get("data") or {}).get("flip", True) if flip is None else flip),
        val_nfolds=int(vcfg.get("nfolds", 10)),
        acc_full_every=int(vcfg.get("acc_full_every", 0) or 0),
        predict_chunk=int(classifier_cfg.get("predict_chunk", 65536)),
        config=plain,
    )


def module_from_checkpoint(path: str | Path) -> HFSoftmaxModule:
    """Rebuild the module a train.py checkpoint was written by and load its state (CPU).

    Old checkpoints' configs are mapped to the current keys (``upgrade_config``).
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    hparams = ckpt.get("hyper_parameters") or {}
    if "cfg" not in hparams or "num_classes" not in hparams:
        raise ValueError(
            f"{path}: no hyper_parameters.cfg / num_classes (not written by train.py?)"
        )
    module = build_module(upgrade_config(hparams["cfg"]), int(hparams["num_classes"]))
    module.on_load_checkpoint(ckpt)
    module.load_state_dict(ckpt["state_dict"])
    return module
