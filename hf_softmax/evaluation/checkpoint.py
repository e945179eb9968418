"""Load what evaluate.py needs from a train.py checkpoint: the backbone and the classifier rows.

``load_checkpoint`` rebuilds the backbone from the checkpoint's own ``model`` config and copies
its ``backbone.*`` weights from the memory-mapped file (the N x D classifier is never read
unless ``classifier_rows`` is asked for it). Checkpoints of any age load: the saved config is
mapped to the current keys (``hf_softmax.config_keys.upgrade_config``), and DDP / FSDP /
``torch.compile`` wrapper prefixes are stripped from parameter names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra.utils
import torch
from omegaconf import OmegaConf
from torch import nn

from hf_softmax.backbones import build_backbone
from hf_softmax.config_keys import HEADS, upgrade_config
from hf_softmax.evaluation.errors import EvaluateError
from hf_softmax.heads import MarginHead

log = logging.getLogger(__name__)

# prefixes that DDP/FSDP/torch.compile wrappers put in front of (or inside) parameter names
_WRAPPER_PREFIXES = ("module.", "_forward_module.")


@dataclass
class LoadedCheckpoint:
    path: Path
    backbone: nn.Module  # eval mode, CPU
    model_cfg: dict[str, Any]  # name, embedding_dim, input_size, ...
    train_cfg: dict[str, Any]  # ckpt["hyper_parameters"]["cfg"] ({} if absent)
    state_dict: dict[str, torch.Tensor] = field(repr=False)  # memory-mapped, all keys


def plain_config(x: Any) -> Any:
    """An OmegaConf node -> plain dicts/lists (resolved); anything else unchanged."""
    return OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else x


def _strip_wrappers(key: str) -> str:
    """'_forward_module.module.backbone._orig_mod.conv1.weight' -> 'backbone.conv1.weight'."""
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key.replace("_orig_mod.", "")


def _list(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _same_backbone(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(str(a.get(k)) == str(b.get(k)) for k in ("name", "embedding_dim", "input_size"))


def load_checkpoint(path: str | Path, model_cfg: dict[str, Any] | None = None) -> LoadedCheckpoint:
    """Rebuild the backbone of a train.py checkpoint and load its `backbone.*` weights.

    `model_cfg` (the `model=` group, optional) must agree with the checkpoint's own
    hyper_parameters.cfg.model; it is only needed for checkpoints without hyper-parameters.
    Classifier (and any other non-backbone) keys are ignored, so sharded/DDP checkpoints work.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluateError(
            f"checkpoint not found: {path} (expected a .ckpt written by train.py; pass ckpt=PATH)"
        )
    try:
        # mmap: tensors stay on disk until touched; the backbone is copied, the rest never read
        ckpt = torch.load(path, mmap=True, map_location="cpu", weights_only=False)
    except RuntimeError as exc:
        if "mmap" not in str(exc) and "zip" not in str(exc):
            raise EvaluateError(f"{path}: cannot read checkpoint: {exc}") from exc
        log.warning("%s: legacy (non-zip) file, loading without mmap", path)
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise EvaluateError(
                f"{path}: not a torch checkpoint ({type(exc2).__name__}: {exc2})"
            ) from exc2
    except Exception as exc:
        raise EvaluateError(
            f"{path}: not a torch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        found = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise EvaluateError(
            f"{path}: expected a Lightning checkpoint with key 'state_dict', found {found}"
        )
    train_cfg = plain_config((ckpt.get("hyper_parameters") or {}).get("cfg")) or {}
    if isinstance(train_cfg, dict) and train_cfg:
        train_cfg = upgrade_config(train_cfg)  # older checkpoints: current keys
    ckpt_model = plain_config(train_cfg.get("model")) if isinstance(train_cfg, dict) else None
    if model_cfg and ckpt_model and not _same_backbone(model_cfg, ckpt_model):
        raise EvaluateError(
            f"{path}: checkpoint of another backbone: it was trained with model={ckpt_model}, "
            f"but model={model_cfg} was requested (drop model= to use the checkpoint's own)"
        )
    model_cfg = dict(ckpt_model or model_cfg or {})
    if "name" not in model_cfg:
        raise EvaluateError(
            f"{path}: no hyper_parameters.cfg.model in the checkpoint (not written by train.py?); "
            "pass model=<backbone> to say which backbone it holds"
        )
    kwargs = {k: v for k, v in model_cfg.items() if not str(k).startswith("_")}
    backbone = build_backbone(**kwargs)

    state = ckpt["state_dict"]
    weights: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        plain = _strip_wrappers(key)
        if plain.startswith("backbone."):
            weights[plain[len("backbone.") :]] = value
    if not weights:
        raise EvaluateError(
            f"{path}: state_dict has no 'backbone.*' keys; found: {_list(sorted(state))}"
        )
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(
        f"{k} {tuple(weights[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(weights) & set(expected)
        if weights[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong:
        raise EvaluateError(
            f"{path}: backbone weights do not match {model_cfg.get('name')!r} "
            f"(embedding_dim={model_cfg.get('embedding_dim')}, "
            f"input_size={model_cfg.get('input_size')}); checkpoint of another backbone?\n"
            f"  missing from checkpoint: {_list(missing) or '-'}\n"
            f"  unexpected in checkpoint: {_list(unexpected) or '-'}\n"
            f"  shape (checkpoint vs model): {_list(wrong) or '-'}"
        )
    backbone.load_state_dict(weights, strict=True)
    backbone.eval()
    ignored = len(state) - len(weights)
    log.info(
        "loaded backbone %s from %s (%d tensors; %d non-backbone keys ignored)",
        model_cfg["name"],
        path,
        len(weights),
        ignored,
    )
    return LoadedCheckpoint(path, backbone, model_cfg, train_cfg, state)


def classifier_rows(loaded: LoadedCheckpoint) -> tuple[torch.Tensor, MarginHead]:
    """The checkpoint's classifier rows W (N, D), memory-mapped, and its head (plain logits)."""
    state = loaded.state_dict
    wkey = next((k for k in state if _strip_wrappers(k) == "classifier.weight"), None)
    if wkey is None:
        found = [k for k in state if "classifier" in k]
        raise EvaluateError(
            f"{loaded.path}: closed-set top-1 needs 'classifier.weight' (N, D); "
            f"classifier keys found: {_list(found) or '-'}"
        )
    head_cfg = dict(loaded.train_cfg.get("head") or {"_target_": HEADS["linear"]})
    head = hydra.utils.instantiate(head_cfg)
    return state[wkey], head
