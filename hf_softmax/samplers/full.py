"""``full``: the honest dense baseline, logits over all N classes every step.

``dense = True`` tells the classifier to keep W as an ordinary ``nn.Parameter`` trained by the
torch optimizer, exactly as a user would write a plain softmax classifier. ``num`` is ignored
(M = N); ``select`` returns the identity set (ids = 0..N-1, targets = labels), so it does not
put positives first.
"""

from __future__ import annotations

import torch

from hf_softmax.samplers.active_set import ActiveSet
from hf_softmax.samplers.base import Sampler


class FullSampler(Sampler):
    name = "full"
    dense = True
    needs_index = False

    def __init__(
        self, num_classes: int, num: int | None = None, metric: str = "ip", seed: int = 0
    ) -> None:
        super().__init__(num_classes, num_classes, metric, seed)
        self._all_ids = torch.arange(self.num_classes, dtype=torch.int64)

    def select(self, features: torch.Tensor, labels: torch.Tensor) -> ActiveSet:
        labels = labels.detach().to("cpu", torch.int64).view(-1)
        self.num_selects += 1
        return ActiveSet(
            ids=self._all_ids, targets=labels, num_positives=int(torch.unique(labels).numel())
        )
