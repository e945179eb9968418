"""A small, fast CNN for tests and the 32x32 demo (~9 MMACs at 32x32, ~0.5M parameters).

Three stride-2 stages of two 3x3 conv-BN-PReLU layers, then adaptive average pooling to a
4x4 map, so any input side >= 16 works (32 for the demo, 112 like the real backbones):

    (B, C, S, S) -> stem 16ch S -> 32ch S/2 -> 64ch S/4 -> 128ch S/8 -> pool 4x4
                 -> BN -> dropout -> FC -> BN -> (B, embedding_dim)

The head mirrors the IResNet one (BN-dropout-FC-BN) so the two behave alike under margin losses.
"""

from __future__ import annotations

import torch
from torch import nn

POOL = 4
MIN_INPUT = 16


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.PReLU(cout),
    )


class TinyNet(nn.Module):
    def __init__(
        self,
        embedding_dim: int = 128,
        input_size: int = 32,
        widths: tuple[int, ...] = (16, 32, 64, 128),
        dropout: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if input_size < MIN_INPUT:
            raise ValueError(f"tiny backbone: input_size={input_size}, expected >= {MIN_INPUT}")
        self.embedding_dim = embedding_dim
        self.input_size = input_size
        self.in_channels = in_channels
        layers = [_conv(in_channels, widths[0], 1)]
        for cin, cout in zip(widths[:-1], widths[1:], strict=True):
            layers += [_conv(cin, cout, 2), _conv(cout, cout, 1)]
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(POOL)
        self.bn = nn.BatchNorm2d(widths[-1])
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[-1] * POOL * POOL, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, S, S), S >= 16 -> (B, embedding_dim)"""
        x = self.dropout(self.bn(self.pool(self.body(x))))
        return self.features(self.fc(torch.flatten(x, 1)))


def tiny(embedding_dim: int = 128, input_size: int = 32, **kw) -> TinyNet:
    return TinyNet(embedding_dim=embedding_dim, input_size=input_size, **kw)
