"""InsightFace IR family (iresnet18/34/50/100): the ArcFace paper's "improved residual" backbone.

Written from the architecture (Deng et al., ArcFace, CVPR 2019, sec. 3 / InsightFace `IResNet`):

- stem: 3x3 conv 64, stride 1 -> BN -> PReLU (keeps 112x112 resolution);
- four stages of improved basic blocks with 64/128/256/512 channels; the first block of every
  stage has stride 2 (112 -> 56 -> 28 -> 14 -> 7), with a 1x1 conv + BN shortcut;
- block: BN -> 3x3 conv -> BN -> PReLU -> 3x3 conv (stride) -> BN, plus the shortcut;
- head ("option E"): BN -> dropout -> flatten -> FC -> BN (the embedding; its scale is frozen at 1).

images: (B, in_channels, S, S) float32 normalised (3: RGB, 1: grayscale)
    -> embeddings: (B, embedding_dim)
"""

from __future__ import annotations

import math

import torch
from torch import nn

LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}
WIDTHS = (64, 128, 256, 512)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, + shortcut.

    x: (B, cin, H, W) -> (B, cout, ceil(H/stride), ceil(W/stride))
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, eps: float = 1e-5) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=eps)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=eps)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=eps)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout, eps=eps)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """Improved ResNet with the BN-dropout-FC-BN embedding head.

    Args:
        layers: blocks per stage, e.g. (3, 4, 14, 3) for iresnet50.
        embedding_dim: D, size of the output embedding.
        input_size: side S of the square input; the FC input is 512 * ceil(S/16)^2.
        dropout: dropout probability before the FC (InsightFace uses 0 for MS1M).
        in_channels: channels of the input images (3: RGB, 1: grayscale).
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        embedding_dim: int = 512,
        input_size: int = 112,
        dropout: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.input_size = input_size
        self.in_channels = in_channels
        self.conv1 = _conv3x3(in_channels, WIDTHS[0])
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        self.prelu = nn.PReLU(WIDTHS[0])
        stages = []
        cin = WIDTHS[0]
        for n_blocks, cout in zip(layers, WIDTHS, strict=True):
            blocks = [IBasicBlock(cin, cout, stride=2)]
            blocks += [IBasicBlock(cout, cout) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        side = input_size
        for _ in range(4):  # 3x3 conv, stride 2, padding 1: out = ceil(in / 2)
            side = math.ceil(side / 2)
        self.bn2 = nn.BatchNorm2d(WIDTHS[-1])
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(WIDTHS[-1] * side * side, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim)
        # The embedding BN only centres: its scale stays 1 so the FC alone sets the norm.
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero the last BN of every residual branch: each block starts as the identity,
        # which lets the 100-layer net train from scratch at lr 0.1.
        for m in self.modules():
            if isinstance(m, IBasicBlock):
                nn.init.zeros_(m.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, S, S) -> (B, embedding_dim)"""
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(x))
        return self.features(self.fc(torch.flatten(x, 1)))


def _factory(name: str):
    def build(embedding_dim: int = 512, input_size: int = 112, **kw) -> IResNet:
        return IResNet(LAYERS[name], embedding_dim=embedding_dim, input_size=input_size, **kw)

    build.__name__ = name
    build.__doc__ = f"{name}: IResNet with blocks per stage {LAYERS[name]}."
    return build


iresnet18 = _factory("iresnet18")
iresnet34 = _factory("iresnet34")
iresnet50 = _factory("iresnet50")
iresnet100 = _factory("iresnet100")
