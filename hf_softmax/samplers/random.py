"""``random``: the batch's positives plus uniform random negatives (as in Partial FC).

Per step: O(M) ids drawn by rejection sampling; no index, nothing to rebuild.
"""

from __future__ import annotations

from typing import Any

from hf_softmax.samplers.base import Sampler


class RandomSampler(Sampler):
    name = "random"
    dense = False
    needs_index = False

    def __init__(
        self, num_classes: int, num: int, metric: str = "ip", seed: int = 0, **selection: Any
    ) -> None:
        super().__init__(num_classes, num, metric, seed, **selection)
