"""FreezeGC with a real Trainer: the objects alive at train start sit in the permanent GC
generation while training runs (full collections skip them), and are handed back after."""

from __future__ import annotations

import gc

import pytest
import pytorch_lightning as pl

from callbacks.gc_freeze import FreezeGC
from hf_softmax.build import build_module
from tests.test_index_rebuild import NUM_CLASSES, fit, make_cfg


class FreezeCount(pl.Callback):
    """Records ``gc.get_freeze_count()`` at every step start."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.counts.append(gc.get_freeze_count())


@pytest.mark.parametrize("enabled", [True, False])
def test_objects_alive_at_train_start_are_frozen_while_training(enabled):
    gc.unfreeze()
    cb, seen = FreezeGC(enabled), FreezeCount()
    fit(build_module(make_cfg("random"), NUM_CLASSES), [cb, seen], steps=3)
    if enabled:  # the model, the framework, the modules: many thousands of objects
        assert len(seen.counts) == 3 and min(seen.counts) > 10_000
    else:
        assert seen.counts == [0, 0, 0]
    assert gc.get_freeze_count() == 0 and cb.frozen == 0  # unfrozen when training ends


def test_unfrozen_after_a_failed_fit():
    class Boom(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            raise RuntimeError("boom")

    gc.unfreeze()
    with pytest.raises(RuntimeError, match="boom"):
        fit(build_module(make_cfg("random"), NUM_CLASSES), [FreezeGC(), Boom()], steps=3)
    assert gc.get_freeze_count() == 0


def test_train_config_has_it(tmp_path):
    from tests.test_configs import compose_train

    cfg = compose_train([], tmp_path)
    assert cfg.callbacks.gc_freeze._target_ == "callbacks.gc_freeze.FreezeGC"
    assert cfg.callbacks.gc_freeze.enabled is True
