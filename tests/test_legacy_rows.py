"""Checkpoints written before the classifier redesign (tests/fixtures/legacy_ckpt, commit
bbfe33d) load into the new classes with the same rows, momentum and sampler state.

ddp.ckpt (consolidated by the class-sharded classifier) loads here in one process; its
per-rank slices are checked on 2 gloo processes in tests/test_sharded.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_softmax.build import module_from_checkpoint
from hf_softmax.classifier import SampledClassifier
from hf_softmax.dense_classifier import DenseClassifier

LEGACY = Path(__file__).parent / "fixtures" / "legacy_ckpt"


def _classifier_state(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    prefix = "classifier."
    return {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


@pytest.mark.parametrize("name", ["auto", "annoy", "ddp"])
def test_sampled_legacy_checkpoint_loads(name):
    path = LEGACY / f"{name}.ckpt"
    old = _classifier_state(path)
    module = module_from_checkpoint(path)
    clf = module.classifier
    assert isinstance(clf, SampledClassifier) and clf.store.range == (0, 64)
    assert torch.equal(clf.weight, old["weight"])
    assert torch.equal(clf.store.momentum_buffer, old["momentum"])
    assert torch.equal(clf.store.touched, old["touched"])
    assert clf.store.num_updates == int(old["num_updates"])
    num, selects, fallbacks, swaps = old["sampler_counters"].tolist()
    assert clf.num == num == 16
    state = clf.sampler.state_dict()
    assert (state["num_selects"], state["num_fallbacks"], state["num_swaps"]) == (
        selects,
        fallbacks,
        swaps,
    )
    assert torch.equal(state["rng"], old["sampler_rng"])
    # and the state dict written now has the same keys and values
    new = clf.state_dict()
    assert set(new) == set(old)
    for key, value in old.items():
        assert torch.equal(new[key], value), key


def test_dense_legacy_checkpoint_loads():
    path = LEGACY / "full.ckpt"
    old = _classifier_state(path)
    module = module_from_checkpoint(path)
    clf = module.classifier
    assert isinstance(clf, DenseClassifier)
    assert torch.equal(clf.weight.detach(), old["weight"])
    assert set(clf.state_dict()) == {"weight"}
