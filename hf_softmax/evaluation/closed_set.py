"""Closed-set top-1 / top-5 over all N classifier rows, on images of the training classes.

Two sources of labelled images: the held-out split of training (``holdout_loader``: the same
``data.val_fraction`` and seed as training) and labelled ``.rec`` files (``rec_loader``, the
``top1_rec`` option). Rows are scored in chunks, so W (N, D) may stay memory-mapped, by the row
store's chunked ``hf_softmax.row_search.topk_rows`` (one pass over W gives top-5, and top-1 is
its first column). Features use ``embed.flip_embed``.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.utils import to_absolute_path
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from hf_softmax.evaluation.checkpoint import LoadedCheckpoint, classifier_rows
from hf_softmax.evaluation.embed import flip_embed
from hf_softmax.evaluation.errors import EvaluateError
from hf_softmax.heads import MarginHead
from hf_softmax.row_search import topk_rows

TOPK = 5  # closed-set top-k reported next to top-1


@torch.no_grad()
def closed_set_counts(
    backbone: nn.Module,
    loader: Any,
    weight: torch.Tensor,
    head: MarginHead,
    flip: bool,
    chunk_size: int,
    device: torch.device,
) -> np.ndarray:
    """Per-class counts over all N rows: (N, 3) int64 = images, top-1 correct, top-k correct
    (k = TOPK), for a loader of ``(images (B,C,H,W), labels (B,) in 0..N-1)``.

    Rows are scored ``chunk_size`` at a time with the head's plain logits.
    """
    counts = np.zeros((weight.shape[0], 3), np.int64)
    for images, labels in loader:
        f = flip_embed(backbone, images.to(device), flip).float()  # (B, D)
        # one pass over W: column 0 of the top-k is the top-1 (W is read once per batch)
        _, ids = topk_rows(f, weight, head, TOPK, chunk_size)  # (B, k) best first
        hits = (ids.cpu() == labels[:, None]).numpy()  # (B, k)
        hit1, hitk = hits[:, 0], hits.any(axis=1)
        y = labels.numpy()
        np.add.at(counts[:, 0], y, 1)
        np.add.at(counts[:, 1], y, hit1)
        np.add.at(counts[:, 2], y, hitk)
    return counts


def closed_set_result(counts: np.ndarray, name: str, out_dir: Path) -> dict[str, Any]:
    """counts (N, 3) -> {"top1", "top5", "images", "classes", "per_class"}; writes
    ``per_class_<name>.csv`` (class, images, top1_correct, top5_correct; classes with images)."""
    path = out_dir / f"per_class_{name}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "images", "top1_correct", f"top{TOPK}_correct"])
        for c in np.flatnonzero(counts[:, 0]):
            writer.writerow([int(c), *map(int, counts[c])])
    total = int(counts[:, 0].sum())
    return {
        "top1": int(counts[:, 1].sum()) / max(total, 1),
        f"top{TOPK}": int(counts[:, 2].sum()) / max(total, 1),
        "images": total,
        "classes": int(counts.shape[0]),
        "per_class": str(path),
    }


def holdout_loader(data_cfg: Any, train_data: dict, image_size: int, channels: int) -> DataLoader:
    """The held-out images of training (``data`` config; the split the checkpoint's training
    data ``train_data`` held out when ``data_cfg`` sets no ``val_fraction``)."""
    data_cfg = (
        OmegaConf.to_container(data_cfg, resolve=True)
        if OmegaConf.is_config(data_cfg)
        else dict(data_cfg)
    )
    if not data_cfg.get("val_fraction"):
        # the split that training held out: same fraction and seed give the same images
        data_cfg["val_fraction"] = train_data.get("val_fraction") or 0.0
        data_cfg["seed"] = train_data.get("seed", data_cfg.get("seed", 0))
    if not data_cfg["val_fraction"]:
        raise EvaluateError(
            "closed-set top-1 needs held-out images: the checkpoint was trained with "
            "data.val_fraction=0; pass data.val_fraction=<f> (those images were seen in training)"
        )
    data_cfg.update(image_size=int(image_size), channels=int(channels), bins=[])
    dm = hydra.utils.instantiate(data_cfg)
    dm.setup("validate")
    if dm.holdout_dataset is None:
        raise EvaluateError(f"{dm.rec_path}: no held-out images (data.val_fraction too small?)")
    return dm.val_dataloader()[dm.val_names.index("holdout")]


def rec_loader(
    rec: Path, num_classes: int, image_size: int, channels: int, batch_size: int, workers: int = 0
) -> DataLoader:
    """Every image of a labelled .rec (InsightFace or plain layout) whose labels must be
    training class ids 0..num_classes-1 (EvaluateError naming the first key outside)."""
    from data.datasets import RecordImageDataset, collate_images
    from data.layout import read_layout
    from data.recordio import RecordReader

    reader = RecordReader(rec)
    layout = read_layout(reader)
    n = num_classes
    bad = np.flatnonzero((layout.labels < 0) | (layout.labels >= n))
    if len(bad):
        i = int(bad[0])
        raise EvaluateError(
            f"{rec}: record key {int(layout.image_keys[i])} has label {int(layout.labels[i])}, "
            f"expected 0..{n - 1} (top1_rec must share the training label space: the checkpoint "
            f"has N = {n} classifier rows); {len(bad)} of {len(layout)} images out of range"
        )
    size = (int(image_size), int(image_size))
    dataset = RecordImageDataset(
        reader, layout.image_keys, layout.labels, size, channels=int(channels)
    )
    return DataLoader(
        dataset, batch_size=int(batch_size), num_workers=int(workers), collate_fn=collate_images
    )


def resolve_top1_recs(value: Any) -> list[Path]:
    """``top1_rec``: a .rec path, a directory holding ``test.rec``, or a list of them."""
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    entries = value if isinstance(value, list | tuple) else [value]
    out = []
    for entry in entries:
        p = Path(to_absolute_path(str(entry)))
        rec = p / "test.rec" if p.is_dir() else p
        if not rec.is_file():
            raise EvaluateError(
                f"top1_rec={entry}: no RecordIO file at {rec} (expected a .rec with its .idx, "
                "or a directory with test.rec)"
            )
        out.append(rec)
    return out


def closed_set_summary(
    cfg: Any,
    loaded: LoadedCheckpoint,
    backbone: nn.Module,
    flip: bool,
    device: torch.device,
    out_dir: Path,
    taken: Any = (),
) -> dict[str, Any]:
    """evaluate.py's closed-set part: ``{"top1": holdout result}`` (``cfg.top1``: true, or
    auto = data=rec with a held-out split, this run's or the checkpoint's) and
    ``{"closed_set": {name: result}}`` for each ``cfg.top1_rec`` file; {} when neither.

    taken: set names already used (a .rec named like one gets a suffix).
    """
    train_data = loaded.train_cfg.get("data") or {}
    top1 = cfg.top1
    if top1 == "auto":
        split = cfg.data.get("val_fraction") or train_data.get("val_fraction")
        top1 = not cfg.data.get("demo", False) and bool(split)
    recs = resolve_top1_recs(cfg.top1_rec) if cfg.get("top1_rec") else []
    out: dict[str, Any] = {}
    if not (top1 or recs):
        return out
    size = int(loaded.model_cfg["input_size"])
    channels = int(loaded.model_cfg.get("in_channels", 3))
    weight, head = classifier_rows(loaded)
    chunk = int(cfg.get("top1_chunk_size", 65536))

    def score(loader: Any, name: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        counts = closed_set_counts(backbone, loader, weight, head, flip, chunk, device)
        return {**closed_set_result(counts, name, out_dir), "seconds": time.perf_counter() - t0}

    if top1:  # training's held-out split: same data.val_fraction and seed
        out["top1"] = score(holdout_loader(cfg.data, train_data, size, channels), "holdout")
    workers = int(cfg.data.get("num_workers", 0) or 0)
    for rec in recs:
        name = rec.stem
        used = {*taken, *out.get("closed_set", {}), "holdout"}
        if name in used:  # e.g. two test.rec in different directories
            name = f"{name}_{len(used)}"
        loader = rec_loader(rec, len(weight), size, channels, int(cfg.batch_size), workers)
        out.setdefault("closed_set", {})[name] = {"path": str(rec), **score(loader, name)}
    return out
