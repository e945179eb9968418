"""Verification on one ``.bin`` pair set: flip-TTA embeddings, 10-fold metrics, saved outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from data.verification import VerificationSet
from hf_softmax.evaluation.embed import embed_images
from hf_softmax.evaluation.reports import plot_roc
from hf_softmax.metrics import cosine_scores, verification_metrics


def verify_set(
    backbone: nn.Module,
    vs: VerificationSet,
    input_size: int,
    batch_size: int,
    device: torch.device,
    flip: bool,
    channels: int,
    nfolds: int,
    fars: tuple[float, ...],
) -> tuple[dict[str, float], np.ndarray]:
    """-> (verification metrics: acc, acc_std, threshold, tar@far=..., auc; embeddings (2P, D)
    L2-normalised, pairs are rows (2i, 2i+1))."""
    emb = embed_images(
        backbone, vs.images, input_size, batch_size, device, flip, str(vs.path), channels
    )
    metrics = verification_metrics(emb[0::2], emb[1::2], vs.issame, nfolds, fars)
    return metrics, emb


def save_pair_outputs(
    out_dir: Path,
    vs: VerificationSet,
    emb: np.ndarray,
    metrics: dict[str, float],
    features: bool,
    plot: bool,
) -> None:
    """``features/<set>.npy`` (+ ``<set>_issame.npy``) and ``roc_<set>.png``, as asked."""
    if features:
        (out_dir / "features").mkdir(exist_ok=True)
        np.save(out_dir / "features" / f"{vs.name}.npy", emb.astype(np.float32))
        np.save(out_dir / "features" / f"{vs.name}_issame.npy", vs.issame)
    if plot:
        scores = cosine_scores(emb[0::2], emb[1::2])
        plot_roc(scores, vs.issame, metrics, vs.name, out_dir / f"roc_{vs.name}.png")
