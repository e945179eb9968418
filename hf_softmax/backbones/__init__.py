"""Backbones: images (B, 3, S, S) float32 normalised -> embeddings (B, embedding_dim).

One file per family, registered by name; `build_backbone(**cfg.model)` is the factory the
training module and evaluate.py use. Adding a backbone = one file + one entry here + one
`conf/model/<name>.yaml`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from hf_softmax.backbones.iresnet import IResNet, iresnet18, iresnet34, iresnet50, iresnet100
from hf_softmax.backbones.mobilefacenet import MobileFaceNet, mobilefacenet
from hf_softmax.backbones.tiny import TinyNet, tiny

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "iresnet18": iresnet18,
    "iresnet34": iresnet34,
    "iresnet50": iresnet50,
    "iresnet100": iresnet100,
    "mobilefacenet": mobilefacenet,
    "tiny": tiny,
}


def build_backbone(
    name: str, embedding_dim: int = 512, input_size: int = 112, **kw: object
) -> nn.Module:
    """Build the backbone registered as `name`.

    The module has attributes `embedding_dim` and `input_size`; extra keyword arguments go to
    the family's constructor (e.g. `dropout`). Unknown names raise ValueError listing the
    valid ones.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name](embedding_dim=int(embedding_dim), input_size=int(input_size), **kw)


__all__ = ["BACKBONES", "IResNet", "MobileFaceNet", "TinyNet", "build_backbone"]
