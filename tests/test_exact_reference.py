"""The exact-selection training step against an independent, minimal implementation.

Reference (written from the method's description, sharing no code with the project): dense rows
W (N, D), exact top-k by brute-force cosine over all rows, the active set = positives then the
nearest rows in rank order (deduplicated, positives removed, trimmed), a CosFace softmax over
it, and torch's own SGD (momentum, weight decay) on one nn.Parameter per row, which skips rows
without a gradient (lazy). Project: SampledClassifier + the `exact` sampler rebuilt every step
(what IndexRebuild does with interval 1). Same data, same steps: same active sets, same
losses, same rows.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from hf_softmax.classifier import SampledClassifier
from hf_softmax.heads import CosFaceHead
from hf_softmax.samplers import build_sampler

N, D, B, M, STEPS = 60, 8, 6, 20, 12
LR, MU, WD, S, MARGIN = 0.2, 0.9, 5e-4, 20.0, 0.1


def reference_active(w: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor) -> list[int]:
    positives = sorted(set(labels.tolist()))
    want = M - len(positives)
    k = math.ceil(want / B) + 1
    cos = F.normalize(feats, dim=1) @ F.normalize(w, dim=1).t()  # (B, N)
    ranked = cos.topk(k, dim=1).indices  # (B, k)
    chosen = list(positives)
    for rank in range(k):  # rank-major: every sample's best row first
        for i in range(B):
            c = int(ranked[i, rank])
            if c not in chosen:
                chosen.append(c)
    return chosen[: len(positives) + want]


def test_exact_step_equals_minimal_reference():
    g = torch.Generator().manual_seed(0)
    init = torch.randn(N, D, generator=g) * 0.3
    data = [(torch.randn(B, D, generator=g), torch.randint(0, N, (B,), generator=g))
            for _ in range(STEPS)]  # fmt: skip

    head = CosFaceHead(S, MARGIN)
    sampler = build_sampler({"name": "exact", "num": M}, N, head.metric, seed=0)
    clf = SampledClassifier(N, D, head, sampler, momentum=MU, weight_decay=WD, seed=0)
    clf.weight.copy_(init)

    rows = [nn.Parameter(r.clone()) for r in init]
    opt = torch.optim.SGD(rows, lr=LR, momentum=MU, weight_decay=WD)
    for feats, labels in data:
        sampler.swap(sampler.build_index(clf.snapshot_weights()))
        out = clf(feats, labels)
        out.loss.backward()
        clf.step(out, LR)

        w_now = torch.stack([r.detach() for r in rows])
        ids = reference_active(w_now, feats, labels)
        assert out.active.ids.tolist() == ids  # nothing random: M is filled from the index
        opt.zero_grad(set_to_none=True)
        active = torch.stack([rows[i] for i in ids])
        targets = torch.tensor([ids.index(int(y)) for y in labels])
        cos = F.normalize(feats, dim=1) @ F.normalize(active, dim=1).t()
        cos = cos - MARGIN * F.one_hot(targets, len(ids))
        loss = F.cross_entropy(S * cos, targets)
        loss.backward()
        opt.step()
        assert torch.allclose(out.loss, loss, atol=1e-5)
    assert torch.allclose(clf.weight, torch.stack([r.detach() for r in rows]), atol=1e-5)
