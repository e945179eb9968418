"""What evaluate.py evaluates with: the verification sets (``bins``), flip TTA and device.

``bins`` entries resolve by the DataModule's rule (``data.verification.find_bin``): a path, or a
set name (lfw, cfp_fp, ...) looked up as ``<dir>/<name>.bin`` in data.path and, for demo data,
in the demo directory of the checkpoint's own run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from data.verification import find_bin, is_bin_name
from hf_softmax.evaluation.checkpoint import plain_config
from hf_softmax.evaluation.errors import EvaluateError

INSIGHTFACE_SETS = ("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw")


def resolve_bins(cfg: DictConfig, train_cfg: dict[str, Any]) -> list[Path]:
    """`bins` entries -> .bin paths, by the DataModule's rule (``data.verification.find_bin``).

    An entry is a path or a set name (lfw, cfp_fp, ...) looked up as <dir>/<name>.bin in
    data.path (its parent when it is a file) and, for demo data, the demo directory. Empty
    `bins`: data.bins, else the demo's pairs.bin.
    """
    entries = [str(e) for e in (cfg.get("bins") or cfg.data.get("bins") or [])]
    if not entries:
        return [_demo_dir(cfg, train_cfg) / "pairs.bin"]
    data_path = cfg.data.get("path")
    dirs: list[Path] = []
    if data_path:
        p = Path(to_absolute_path(str(data_path)))
        dirs.append(p.parent if p.is_file() else p)
    if (cfg.data.get("demo") or not data_path) and any(map(is_bin_name, entries)):
        dirs.append(_demo_dir(cfg, train_cfg))
    out = []
    for entry in entries:
        try:
            out.append(find_bin(entry, dirs, cwd=Path(to_absolute_path("."))))
        except FileNotFoundError as exc:
            hint = (
                f"; InsightFace sets ({', '.join(INSIGHTFACE_SETS)}) are looked up in data.path"
                if entry in INSIGHTFACE_SETS
                else f"; known names: {', '.join(INSIGHTFACE_SETS)}, or give a path to a .bin"
            )
            raise EvaluateError(f"{exc}{hint}") from None
    return out


def _demo_dir(cfg: DictConfig, train_cfg: dict[str, Any]) -> Path:
    """The demo directory: the checkpoint's own demo when it was trained on one (its pairs
    come from identities that run never saw), else the one data.demo_kwargs describes."""
    from data.demo import ensure_demo

    train_data = train_cfg.get("data") or {}
    if train_data.get("demo"):
        kwargs = dict(train_data.get("demo_kwargs") or {})
    else:
        kwargs = dict(plain_config(cfg.data.get("demo_kwargs")) or {})
    return Path(ensure_demo(**kwargs))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_flip(value: Any, train_cfg: dict[str, Any]) -> bool:
    """``flip``: true/false, or ``auto`` = the checkpoint's data.flip (true when absent:
    checkpoints from before data.flip trained with random flips)."""
    if str(value).lower() == "auto":
        return bool((train_cfg.get("data") or {}).get("flip", True))
    if isinstance(value, bool):
        return value
    raise EvaluateError(f"flip={value!r}: expected true, false or auto")
