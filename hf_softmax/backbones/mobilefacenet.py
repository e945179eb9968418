"""MobileFaceNet (Chen et al., "MobileFaceNets", CCBR 2018): a ~1M-parameter face embedder.

Table 1 of the paper, for a 112x112 input (t: expansion, c: channels, n: repeats, s: stride):

    conv3x3            c=64            s=2    -> 56x56
    depthwise conv3x3  c=64            s=1
    bottleneck   t=2   c=64    n=5     s=2    -> 28x28
    bottleneck   t=4   c=128   n=1     s=2    -> 14x14
    bottleneck   t=2   c=128   n=6     s=1
    bottleneck   t=4   c=128   n=1     s=2    -> 7x7
    bottleneck   t=2   c=128   n=2     s=1
    conv1x1            c=512
    linear GDConv7x7   c=512                   (global depthwise conv: learnable spatial weights)
    linear conv1x1     c=embedding_dim  -> BN  (the embedding)

Nonlinearity PReLU everywhere except the "linear" layers and the bottleneck projections.
images: (B, in_channels, S, S) -> embeddings: (B, embedding_dim); the GDConv kernel is ceil(S/16).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# (expansion t, channels c, repeats n, stride s) of the bottleneck stages
BOTTLENECKS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


class ConvBN(nn.Sequential):
    """conv -> BN [-> PReLU]; `groups=cin` makes it depthwise."""

    def __init__(
        self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True
    ) -> None:
        pad = 0 if k == 1 else k // 2
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, k, stride=stride, padding=pad, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act:
            layers.append(nn.PReLU(cout))
        super().__init__(*layers)


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand -> 3x3 depthwise (stride) -> 1x1 linear projection.

    x: (B, cin, H, W) -> (B, cout, ceil(H/stride), ceil(W/stride)); residual when shapes match.
    """

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            ConvBN(cin, hidden, 1),
            ConvBN(hidden, hidden, 3, stride=stride, groups=hidden),
            ConvBN(hidden, cout, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileFaceNet(nn.Module):
    def __init__(self, embedding_dim: int = 512, input_size: int = 112, in_channels: int = 3):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.input_size = input_size
        self.in_channels = in_channels
        layers: list[nn.Module] = [
            ConvBN(in_channels, 64, 3, stride=2),
            ConvBN(64, 64, 3, groups=64),
        ]
        cin = 64
        for t, c, n, s in BOTTLENECKS:
            for i in range(n):
                layers.append(Bottleneck(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(ConvBN(cin, 512, 1))
        self.body = nn.Sequential(*layers)
        side = input_size
        for _ in range(4):  # four stride-2 layers, each ceil(in / 2)
            side = math.ceil(side / 2)
        self.gdconv = ConvBN(512, 512, side, groups=512, act=False)
        self.gdconv[0].padding = (0, 0)  # global: the kernel covers the whole map
        self.linear = nn.Conv2d(512, embedding_dim, 1, bias=False)
        self.features = nn.BatchNorm1d(embedding_dim)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, S, S) -> (B, embedding_dim)"""
        x = self.gdconv(self.body(x))  # (B, 512, 1, 1)
        return self.features(torch.flatten(self.linear(x), 1))


def mobilefacenet(embedding_dim: int = 512, input_size: int = 112, **kw) -> MobileFaceNet:
    """MobileFaceNet with a D-dimensional embedding (the paper uses D=128; we default to 512)."""
    return MobileFaceNet(embedding_dim=embedding_dim, input_size=input_size, **kw)
