"""Backbones: images (B, C, S, S) float32 normalised -> embeddings (B, embedding_dim).

C = ``in_channels``: 3 for RGB (the default), 1 for grayscale data (``model.in_channels``).

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
    name: str,
    embedding_dim: int = 512,
    input_size: int = 112,
    in_channels: int = 3,
    **kw: object,
) -> nn.Module:
    """Build the backbone registered as `name`.

    The module has attributes `embedding_dim`, `input_size` and `in_channels` (channels of
    its input images, the first conv's input); extra keyword arguments go to the family's
    constructor (e.g. `dropout`). Unknown names raise ValueError listing the valid ones.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(sorted(BACKBONES))}")
    if int(in_channels) < 1:
        raise ValueError(f"backbone {name!r}: model.in_channels={in_channels}, expected >= 1")
    return BACKBONES[name](
        embedding_dim=int(embedding_dim),
        input_size=int(input_size),
        in_channels=int(in_channels),
        **kw,
    )


__all__ = ["BACKBONES", "IResNet", "MobileFaceNet", "TinyNet", "build_backbone"]
