"""Margin heads against hand-written per-element references (float64 and float32)."""

import math
from pathlib import Path

import hydra.utils
import pytest
import torch
import yaml

from hf_softmax.heads import HEADS, ArcFaceHead, CosFaceHead, LinearHead, build_head

CONF = Path(__file__).resolve().parents[1] / "conf" / "head"


def _cos(f, w):
    return sum(a * b for a, b in zip(f, w, strict=True)) / (
        math.sqrt(sum(a * a for a in f)) * math.sqrt(sum(b * b for b in w))
    )


def reference_logits(name, features, weight, targets, scale, margin, easy_margin=False):
    """Element-by-element Python reference (float64 via math)."""
    out = []
    for i, f in enumerate(features.tolist()):
        row = []
        for j, w in enumerate(weight.tolist()):
            if name == "linear":
                row.append(scale * sum(a * b for a, b in zip(f, w, strict=True)))
                continue
            c = _cos(f, w)
            if j == int(targets[i]):
                if name == "cosface":
                    c = c - margin
                else:
                    theta = math.acos(max(-1.0, min(1.0, c)))
                    if easy_margin:
                        c = math.cos(theta + margin) if c > 0 else c
                    elif theta + margin < math.pi:
                        c = math.cos(theta + margin)
                    else:  # past pi cos(theta+m) would rise again: linear penalty instead
                        c = c - margin * math.sin(margin)
            row.append(scale * c)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


CASES = [
    ("linear", {"scale": 1.0, "margin": 0.0}),
    ("linear", {"scale": 2.5, "margin": 0.0}),
    ("cosface", {"scale": 64.0, "margin": 0.4}),
    ("arcface", {"scale": 64.0, "margin": 0.5}),
    ("arcface", {"scale": 30.0, "margin": 0.5, "easy_margin": True}),
]


@pytest.mark.parametrize("name,kw", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_head_matches_reference(name, kw, dtype):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(6, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(9, 5, generator=g, dtype=torch.float64)
    weight[3] = -features[1] * 2.0  # theta = pi at a target: the branch past pi - m
    targets = torch.tensor([0, 3, 8, 2, 2, 7])
    head = build_head(name, **kw)
    ref = reference_logits(name, features, weight, targets, **kw)
    got = head(features.to(dtype), weight.to(dtype), targets)
    assert got.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-4 * max(1.0, kw["scale"])
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=tol)
    plain = head.plain_logits(features.to(dtype), weight.to(dtype))
    no_margin = reference_logits(name, features, weight, targets, kw["scale"], 0.0)
    torch.testing.assert_close(plain.double(), no_margin, rtol=0, atol=tol)


def test_arcface_target_logit_decreases_with_angle_and_has_finite_grad():
    head = ArcFaceHead(scale=1.0, margin=0.5)
    cos = torch.linspace(1.0, -1.0, 401, dtype=torch.float64, requires_grad=True)
    phi = head.target_logit(cos)
    assert torch.all(phi[1:] <= phi[:-1] + 1e-12)  # monotone in theta, no jump back up
    phi.sum().backward()
    assert torch.isfinite(cos.grad).all()


def test_half_inputs_give_float32_logits():
    f = torch.randn(4, 8).half()
    w = torch.randn(10, 8).half()
    assert CosFaceHead()(f, w, torch.zeros(4, dtype=torch.int64)).dtype == torch.float32


def test_registry_metrics_configs_and_errors():
    assert set(HEADS) == {"linear", "cosface", "arcface"}
    assert LinearHead().metric == "ip"
    for name in ("cosface", "arcface"):
        assert build_head(name).metric == "cosine"
    for path in sorted(CONF.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())  # a _target_ node (objects built by Hydra)
        head = hydra.utils.instantiate(cfg)
        assert isinstance(head, HEADS[path.stem])
        assert head.scale == cfg["scale"] and head.margin == cfg["margin"]
    with pytest.raises(ValueError, match="valid names"):
        build_head("sphereface")
    with pytest.raises(ValueError, match="margin must be 0.0"):
        build_head("linear", margin=0.3)
