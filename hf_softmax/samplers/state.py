"""The RNG and counters of a sampler: what a checkpoint keeps and a selection ahead undoes.

``Sampler`` (``samplers/base.py``) mixes this in; it owns ``generator`` (the torch generator
of the random fill), ``num`` (M) and the counters ``num_selects``, ``num_fallbacks`` and
``num_swaps``. A checkpoint saves them, never the index (it is rebuilt after loading); a
selection made ahead (``hf_softmax.select_ahead``) is undone by restoring them.
"""

from __future__ import annotations

from typing import Any

import torch


class SamplerState:
    """``selection_state``/``restore_selection`` and ``state_dict``/``load_state_dict`` over
    the attributes ``Sampler.__init__`` sets."""

    generator: torch.Generator
    num: int
    num_selects: int
    num_fallbacks: int
    num_swaps: int

    # -- selection ahead (``SampledClassifier``, label mode) --------------------------------
    def selection_state(self) -> dict[str, Any]:
        """What a ``select`` changes (RNG, counters), to undo a select made ahead."""
        return {"rng": self.generator.get_state(), "num_selects": self.num_selects,
                "num_fallbacks": self.num_fallbacks, "swaps": self.num_swaps}  # fmt: skip

    def restore_selection(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["rng"])
        self.num_selects, self.num_fallbacks = state["num_selects"], state["num_fallbacks"]

    # -- checkpoint ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """RNG state and counters; never the index (it is rebuilt after loading)."""
        return {
            "rng": self.generator.get_state(),
            "num": self.num,
            "num_selects": self.num_selects,
            "num_fallbacks": self.num_fallbacks,
            "num_swaps": self.num_swaps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(torch.as_tensor(state["rng"], dtype=torch.uint8).cpu())
        if "num" in state:
            self.num = int(state["num"])
        self.num_selects = int(state.get("num_selects", 0))
        self.num_fallbacks = int(state.get("num_fallbacks", 0))
        self.num_swaps = int(state.get("num_swaps", 0))
