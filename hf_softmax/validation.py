"""What ``HFSoftmaxModule``'s validation accumulates over an epoch and reports at its end.

"holdout": closed-set top-1 / top-5 hit counts over all N classes (``classifier.topk``);
each .bin set: embeddings of its images by index -> 10-fold verification accuracy
(``metrics.verification_metrics``), pairs with a missing image left out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from hf_softmax.metrics import verification_metrics

log = logging.getLogger(__name__)


def verification(
    emb: torch.Tensor, index: torch.Tensor, issame: np.ndarray, nfolds: int = 10
) -> dict[str, float]:
    """emb (n, D) of images ``index`` (n,) of a .bin with issame (P,) -> metrics.

    Pairs with an image missing (partial validation runs) are left out; {} with < 2 pairs.
    """
    num_pairs = len(issame)
    full = torch.zeros(2 * num_pairs, emb.shape[1])
    seen = torch.zeros(2 * num_pairs, dtype=torch.bool)
    full[index] = emb
    seen[index] = True
    ok = (seen[0::2] & seen[1::2]).numpy()
    if ok.sum() < 2:
        return {}
    e1, e2 = full[0::2][ok].numpy(), full[1::2][ok].numpy()
    return verification_metrics(e1, e2, issame[ok], nfolds=nfolds)


class ValidationEpoch:
    """One validation epoch's accumulators, by set name."""

    def __init__(self, nfolds: int = 10) -> None:
        self.nfolds = int(nfolds)
        self.holdout: dict[str, list[int]] = {}  # name -> [top-1 hits, top-5 hits, images]
        self.embeddings: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    def add_holdout(self, name: str, top: torch.Tensor, labels: torch.Tensor) -> None:
        """top (B, k) class ids best first, labels (B,)."""
        hits = top.to(labels.device) == labels[:, None]
        acc = self.holdout.setdefault(name, [0, 0, 0])
        acc[0] += int(hits[:, 0].sum())
        acc[1] += int(hits.any(dim=1).sum())
        acc[2] += int(labels.numel())

    def add_embeddings(self, name: str, index: torch.Tensor, emb: torch.Tensor) -> None:
        """index (B,) image positions in the .bin, emb (B, D)."""
        store = self.embeddings.setdefault(name, ([], []))
        store[0].append(index.detach().to("cpu", torch.int64))
        store[1].append(emb.detach().float().cpu())

    def results(
        self, gather: Callable[[torch.Tensor], torch.Tensor], sets: Mapping[str, Any]
    ) -> list[tuple[str, float, bool]]:
        """-> [(metric name, value, show in the progress bar)]; ``gather`` concatenates a
        tensor over the ranks (the identity on one process); ``sets``: name -> .bin set."""
        out: list[tuple[str, float, bool]] = []
        for name, value in self.holdout.items():
            counts = gather(torch.tensor([value], dtype=torch.float64)).sum(0)
            out.append((f"val/{name}/top1", float(counts[0] / max(counts[2], 1)), True))
            out.append((f"val/{name}/top5", float(counts[1] / max(counts[2], 1)), False))
        for name, (index, emb) in self.embeddings.items():
            if name not in sets:
                log.warning("no verification set %r in the datamodule; skipped", name)
                continue
            issame = np.asarray(sets[name].issame, dtype=bool)
            metrics = verification(
                gather(torch.cat(emb)), gather(torch.cat(index)), issame, self.nfolds
            )
            out += [(f"val/{name}/{k}", float(v), k == "acc") for k, v in metrics.items()]
        return out
