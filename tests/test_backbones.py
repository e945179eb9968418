"""Every registered backbone: (B, 3, S, S) -> (B, D) finite embeddings (and 1-channel input);
factory and cost counter."""

import pytest
import torch
from omegaconf import OmegaConf

from hf_softmax.backbones import BACKBONES, build_backbone
from hf_softmax.metrics import count_params, model_cost
from tests.conftest import REPO

CASES = [
    (name, size, 1 if name in ("iresnet100", "iresnet50") else 2)
    for name in sorted(BACKBONES)
    for size in ((32, 112) if name == "tiny" else (112,))
]


@pytest.mark.parametrize(("name", "size", "batch"), CASES)
def test_shape_and_finite(name: str, size: int, batch: int) -> None:
    torch.manual_seed(0)
    dim = 64
    model = build_backbone(name, embedding_dim=dim, input_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 3, size, size))
    assert out.shape == (batch, dim)
    assert torch.isfinite(out).all()
    assert model.embedding_dim == dim and model.input_size == size


@pytest.mark.parametrize("name", ["tiny", "iresnet18", "mobilefacenet"])
def test_one_input_channel(name: str) -> None:
    """in_channels=1 (grayscale): the first conv takes 1 channel; (B, 1, S, S) -> (B, D)."""
    size = 32 if name == "tiny" else 112
    model = build_backbone(name, embedding_dim=16, input_size=size, in_channels=1).eval()
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 1 and model.in_channels == 1
    with torch.no_grad():
        out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, 16) and torch.isfinite(out).all()
    rgb = build_backbone(name, embedding_dim=16, input_size=size)
    assert model_cost(model, size).params < model_cost(rgb, size).params


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_model_yaml_builds(name: str) -> None:
    cfg = OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
    assert cfg.name == name
    assert cfg.embedding_dim == (128 if name == "tiny" else 512)
    assert cfg.input_size == (32 if name == "tiny" else 112)
    assert cfg.in_channels == 3
    assert callable(BACKBONES[cfg.name])


def test_tiny_trains_in_batch_mode_and_any_size() -> None:
    model = build_backbone("tiny", embedding_dim=16, input_size=32)
    out = model(torch.randn(4, 3, 16, 16))  # smallest supported side, train mode (BN batch stats)
    out.sum().backward()
    assert out.shape == (4, 16)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match=">= 16"):
        build_backbone("tiny", input_size=8)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="iresnet50.*mobilefacenet.*tiny"):
        build_backbone("resnet9000")


def test_iresnet_head_has_frozen_feature_scale() -> None:
    model = build_backbone("iresnet18")
    assert not model.features.weight.requires_grad
    assert model.fc.in_features == 512 * 7 * 7


def test_model_cost_matches_hand_count() -> None:
    """One conv and one linear layer, counted by hand."""
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),  # out (8, 8, 8)
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 10),
    )
    cost = model_cost(net, 16)
    assert cost.macs == 8 * 8 * 8 * 3 * 3 * 3 + 512 * 10
    assert cost.params == 8 * 3 * 3 * 3 + 512 * 10 + 10
    assert cost.flops == 2 * cost.macs


def test_known_costs() -> None:
    """Published sizes: InsightFace iresnet50 43.6 M params, iresnet18 24.0 M / 2.61 GMACs
    (iresnet50's 6.3 "GFLOPs" are MACs too); MobileFaceNet 221 MMACs (paper, Table 2)."""
    assert abs(count_params(build_backbone("iresnet50")) / 1e6 - 43.59) < 0.01
    r18 = model_cost(build_backbone("iresnet18"), 112)
    assert abs(r18.params / 1e6 - 24.03) < 0.01 and abs(r18.macs / 1e9 - 2.61) < 0.01
    mfn = model_cost(build_backbone("mobilefacenet"), 112)
    assert abs(mfn.macs / 1e6 - 221) < 5
    tiny = model_cost(build_backbone("tiny", embedding_dim=128, input_size=32), 32)
    assert 5e6 <= tiny.macs <= 20e6
