"""FreezeGC: keep Python's cyclic garbage collector from stalling training steps.

A full (generation-2) collection walks every tracked object of the process: the model, the
framework, the loaded modules. In a training process that is hundreds of thousands of
objects, and a collection that fires inside a step stalls it: one took 98–191 ms in the
``bench.build_stall`` process (10^4–10^6 classes, steps of ~10 ms). At train start, after
everything long-lived exists, ``gc.freeze()`` moves the live objects to a permanent
generation that later collections skip: they then walk only what training allocates since.
Nothing is leaked: frozen objects are freed by reference counting as before; only cycles
among them wait for ``gc.unfreeze()``, which ``on_train_end`` and ``on_exception`` call.
"""

from __future__ import annotations

import gc

import pytorch_lightning as pl


def freeze_live_objects() -> int:
    """Collect, then move every live object to the permanent generation; -> how many."""
    gc.collect()  # what is garbage now is freed, not frozen
    gc.freeze()
    return gc.get_freeze_count()


class FreezeGC(pl.Callback):
    """``enabled``: freeze at train start (``callbacks.gc_freeze.enabled=false``: off)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = bool(enabled)
        self.frozen = 0  # objects moved to the permanent generation at train start

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:
            self.frozen = freeze_live_objects()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unfreeze()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._unfreeze()

    def _unfreeze(self) -> None:
        if self.frozen:  # only ever set when enabled
            gc.unfreeze()
            self.frozen = 0
