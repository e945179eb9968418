"""``python -m bench.hangul rows CKPT [CKPT ...]``: how well a trained classifier's rows follow
its features, and how well a class table would stand in for per-feature queries.

For each checkpoint, on the training images of ``--classes`` random classes (all their images):

- the rows' median L2 norm (a cosine head turns a row by ~ lr * |g| / ||w||^2 per update);
- mean cos(feature, own row), cos(feature, own class's mean feature), cos(row, class mean);
- coverage: the share of each image's ``k`` nearest other rows (what ``query=feature``
  selects) found among the ``K`` nearest rows of its class's row (the ``query=label`` table)
  or of its class's mean feature (a table queried with class means).

Exact top-k over all N rows (the checkpoint's ``classifier.weight``), cosine; no index.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def _topk_others(queries: torch.Tensor, rows: torch.Tensor, own: torch.Tensor, k: int):
    scores = queries @ rows.T
    scores[torch.arange(len(own)), own] = -float("inf")
    return scores.topk(k, dim=1).indices


def _coverage(feature_top: torch.Tensor, table: torch.Tensor) -> float:
    k = feature_top.shape[1]
    pairs = zip(feature_top.tolist(), table.tolist(), strict=True)
    hits = [len(set(a) & set(b)) / k for a, b in pairs]
    return float(np.mean(hits))


@torch.no_grad()
def row_report(ckpt: Path, data: Path, classes: int = 300, seed: int = 0) -> dict[str, Any]:
    from data.datasets import RecordImageDataset, collate_images
    from data.layout import read_layout
    from data.recordio import RecordReader
    from hf_softmax.evaluation.checkpoint import classifier_rows, load_checkpoint

    loaded = load_checkpoint(ckpt)
    weight, _ = classifier_rows(loaded)
    raw = torch.as_tensor(np.asarray(weight), dtype=torch.float32)
    rows = F.normalize(raw, dim=1)
    n = rows.shape[0]
    reader = RecordReader(data / "train.rec")
    layout = read_layout(reader)
    picked = np.random.default_rng(seed).choice(n, min(classes, n), replace=False)
    keep = np.flatnonzero(np.isin(layout.labels, picked))
    channels = int(loaded.model_cfg.get("in_channels", 3))
    size = int(loaded.model_cfg.get("input_size", 112))
    dataset = RecordImageDataset(reader, layout.image_keys[keep], layout.labels[keep],
                                 (size, size), channels=channels)  # fmt: skip
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, collate_fn=collate_images)
    feats, labels = [], []
    for images, y in loader:  # the collate already normalises the images
        feats.append(F.normalize(loaded.backbone(images), dim=1))
        labels.append(y)
    f, y = torch.cat(feats), torch.cat(labels)
    means = F.normalize(torch.zeros_like(rows).index_add_(0, y, f), dim=1)
    out: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "images": len(y),
        "classes": len(picked),
        "row_norm_median": float(raw.norm(dim=1).median()),
        "cos_feature_row": float((f * rows[y]).sum(1).mean()),
        "cos_feature_mean": float((f * means[y]).sum(1).mean()),
        "cos_row_mean": float((rows[y] * means[y]).sum(1).mean()),
    }
    for k in (1, 4):
        nearest = _topk_others(f, rows, y, k)
        for big_k in (1, 4, 16):
            out[f"row_table_K{big_k}_covers_top{k}"] = _coverage(
                nearest, _topk_others(rows[y], rows, y, big_k)
            )
            out[f"mean_table_K{big_k}_covers_top{k}"] = _coverage(
                nearest, _topk_others(means[y], rows, y, big_k)
            )
    return out


def add_rows_parser(sub) -> None:
    p = sub.add_parser("rows", help="row norms, row/feature alignment, class-table coverage")
    p.add_argument("ckpt", nargs="+", type=Path, help="train.py checkpoints (last.ckpt)")
    p.add_argument("--data", type=Path, required=True, help="the built Hangul folder")
    p.add_argument("--classes", type=int, default=300, help="classes whose images are embedded")
    p.add_argument("--seed", type=int, default=0)


def rows_main(a: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    for ckpt in a.ckpt:
        report = row_report(ckpt, a.data, a.classes, a.seed)
        print("\n".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}"
                        for k, v in report.items()))  # fmt: skip
        print()
    return 0
