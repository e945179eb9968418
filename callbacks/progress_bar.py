"""TrainingProgressBar: Lightning's TQDM bar with only the numbers that mean something here.

Lightning's bar also shows the logger's run version (``v_num``) and suffixes every metric
logged per step and per epoch with ``_step`` / ``_epoch``. This bar drops ``v_num`` and the
per-epoch loss, and shows the per-step values under their logged names:

- ``train/loss``, ``train/acc``: this step's loss (with the margin) and top-1 within the
  active set on the plain logits (chance: 1/M);
- ``train/acc_epoch``: the mean ``train/acc`` of the previous epoch (it rises epoch by epoch);
- ``val/<set>/acc``, ``val/holdout/top1``: the last validation.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar

DROPPED = ("v_num", "train/loss_epoch")


class TrainingProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` (same arguments) showing ``train/loss``, ``train/acc``,
    ``train/acc_epoch`` and the validation numbers logged with ``prog_bar=True``."""

    def get_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, int | str | float | dict[str, float]]:
        items: dict[str, Any] = super().get_metrics(trainer, pl_module)
        return {
            (k[: -len("_step")] if k.endswith("_step") else k): v
            for k, v in items.items()
            if k not in DROPPED
        }
