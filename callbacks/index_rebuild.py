"""IndexRebuild: the Lightning adapter of ``hf_softmax.index_maintainer.IndexMaintainer``.

The maintainer (plain Python) holds the schedule, the background builds, the recall probe
and the counters; this callback calls it from the Trainer's hooks with ``global_step`` and
the step's features (``training_step`` returns them), and logs the metrics it returns
(``index/rebuild_seconds``, ``index/builds``, ``index/recall@k``, ...). Its knobs are
``callbacks.index_rebuild.*`` (``RebuildSettings``). The counters are saved in the
checkpoint under this callback's name (``IndexRebuild``); the index never is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

from hf_softmax.index_maintainer import IndexMaintainer
from hf_softmax.rebuild_settings import RebuildRecord, RebuildSettings

__all__ = ["IndexRebuild", "RebuildRecord"]


class IndexRebuild(pl.Callback):
    """Keeps ``pl_module.classifier.sampler``'s index fresh; knobs: ``RebuildSettings``."""

    def __init__(
        self,
        interval: int = 20,
        background: bool | str = "auto",
        probe_every: int = 50,
        probe_k: int | None = None,
        min_recall: float | None = None,
        adaptive: bool = False,
        target_recall: float | None = None,
        refresh: bool = True,
        exact_chunk_size: int = 65536,
        build_threads: int | None = None,
        worker_memory: str = "keep",
    ) -> None:
        super().__init__()
        self.settings = RebuildSettings(
            interval, background, probe_every, probe_k, min_recall, adaptive, target_recall,
            refresh, exact_chunk_size, build_threads, worker_memory,
        )  # fmt: skip
        self.maintainer: IndexMaintainer | None = None
        self._loaded: dict[str, Any] = {}  # checkpoint state read before the maintainer exists

    @property
    def interval(self) -> int:
        return self.settings.interval

    def _log(self, pl_module: pl.LightningModule, metrics: dict[str, float]) -> None:
        if not metrics or not pl_module.trainer.training:
            return
        for name, value in metrics.items():
            pl_module.log(name, float(value), on_step=True, on_epoch=False, batch_size=1)

    # -- Lightning hooks -------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        classifier = getattr(pl_module, "classifier", None)
        if classifier is None or getattr(classifier, "sampler", None) is None:
            return
        if self.maintainer is None or self.maintainer.classifier is not classifier:
            state = self.maintainer.state_dict() if self.maintainer else self._loaded
            self.maintainer = IndexMaintainer(classifier, self.settings)
            self.maintainer.load_state_dict(state)
        if self.maintainer.active:
            self.maintainer.start(trainer.global_step)
            sampler = self.maintainer.sampler
            rank_zero_info(f"IndexRebuild: {sampler.name} index over {sampler.num_classes} "
                           f"classes, rebuilt every {self.interval} steps "
                           f"({self.maintainer.mode()})")  # fmt: skip

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.maintainer is not None:
            self._log(pl_module, self.maintainer.on_step_start(trainer.global_step))

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.maintainer is None:
            return
        features = outputs.get("features") if isinstance(outputs, Mapping) else None
        self._log(pl_module, self.maintainer.on_step_end(trainer.global_step, features))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A running build's result is dropped: the next start rebuilds from W anyway.
        if self.maintainer is not None:
            self.maintainer.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.maintainer is not None:
            self.maintainer.close()

    # -- checkpoint ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.maintainer is not None:
            return self.maintainer.state_dict()
        blank = IndexMaintainer(None, self.settings)
        blank.load_state_dict(self._loaded)
        return blank.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)
        if self.maintainer is not None:
            self.maintainer.load_state_dict(state_dict)
