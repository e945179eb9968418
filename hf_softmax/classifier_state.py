"""The consolidated checkpoint of a ``SampledClassifier``: what it writes and how it reads back.

``state_dict()`` (a collective under DDP: call it on every rank) gathers the full (N, D)
``weight``, ``momentum`` and ``touched`` to rank 0 (other ranks write (0, D)), plus
``num_updates``, ``sampler_rng`` (rank 0's stream) and ``sampler_counters`` [M, selects,
fallbacks, swaps]. Loading takes this rank's block from the full tensors, so a checkpoint
resumes with any world size; a dense checkpoint (``sampler=full``) and one written with
``row_momentum: immediate`` have no momentum, which then starts at zero (lazy).
"""

from __future__ import annotations

from typing import Any

import torch

from hf_softmax import collectives as coll
from hf_softmax.row_store import RowStore
from hf_softmax.samplers.base import Sampler

STATE_KEYS = ("weight", "momentum", "num_updates", "touched", "sampler_rng", "sampler_counters")
ROW_KEYS = ("weight", "momentum", "num_updates", "touched")


def sampler_tensors(sampler: Sampler, num: int) -> dict[str, torch.Tensor]:
    """The checkpoint's ``sampler_rng`` (this rank's stream) and ``sampler_counters`` [M,
    selects, fallbacks, swaps]."""
    s = sampler.state_dict()
    counters = [num, s["num_selects"], s["num_fallbacks"], s["num_swaps"]]
    return {"sampler_rng": s["rng"].clone(),
            "sampler_counters": torch.tensor(counters, dtype=torch.int64)}  # fmt: skip


def load_sampler_tensors(sampler: Sampler, found: dict[str, torch.Tensor], rank: int) -> None:
    """Counters and (when saved) the RNG into ``sampler`` (its ``num`` is left alone). Rank 0
    continues the saved stream; other ranks fork from it."""
    _, selects, fallbacks, swaps = (int(x) for x in found["sampler_counters"])
    state = sampler.state_dict()
    state.update(num_selects=selects, num_fallbacks=fallbacks, num_swaps=swaps)
    if "sampler_rng" in found:
        state["rng"] = found["sampler_rng"]
    sampler.load_state_dict(state)
    if rank:
        fork = int(torch.randint(2**62, (1,), generator=sampler.generator))
        sampler.generator.manual_seed(fork + rank)


def checkpoint_tensors(
    store: RowStore, sampler: Sampler, num: int, num_classes: int, world_size: int, group: Any
) -> dict[str, torch.Tensor]:
    """The ``STATE_KEYS`` tensors of this rank's ``store`` and ``sampler``; row tensors are
    consolidated to (N, ...) on rank 0 when ``world_size`` > 1 (a collective)."""
    state = store.state()
    out: dict[str, torch.Tensor] = {}
    for key in ROW_KEYS:
        if key not in state:  # momentum, when the rows keep none (row_momentum immediate)
            continue
        value = state[key]
        if world_size > 1 and key != "num_updates":
            value = coll.consolidate(value, num_classes, group)
        out[key] = value
    out.update(sampler_tensors(sampler, num))
    return out


def split_checkpoint(
    state_dict: dict[str, Any], prefix: str, strict: bool
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """-> (the classifier's own tensors by bare key, every other entry (the head's), the
    missing keys a strict load reports; momentum may be missing)."""
    found = {k: state_dict[prefix + k] for k in STATE_KEYS if prefix + k in state_dict}
    missing = [prefix + k for k in STATE_KEYS if strict and k not in found and k != "momentum"]
    own = {prefix + k for k in STATE_KEYS}
    rest = {k: v for k, v in state_dict.items() if k not in own}
    return found, rest, missing
