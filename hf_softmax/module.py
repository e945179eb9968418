"""HFSoftmaxModule: backbone + sampled classifier as a LightningModule, built objects in.

One training step (manual optimization, so the sparse classifier follows the same LR):

    features = backbone(images)                  # (B, D)
    out = classifier(features, labels)          # active set A (|A| = M), logits (B, M), loss
    backward                                     # grads to backbone params and to W[A]
    optimizer.step()                             # SGD on the backbone (and W when dense "full")
    classifier.step(out, lr)                     # SGD momentum + wd on rows A only, same lr
    scheduler.step()                             # linear warmup, then cosine / step, per step

Logged per step: ``train/loss``, ``train/acc`` (top-1 within the active set on the plain
logits, no margin), ``train/acc_full`` every ``validation.acc_full_every`` steps (top-1 over
all N rows on the batch's features, ``classifier.predict``), ``lr``, ``train/active_size``.

Validation (one DataLoader per name in ``datamodule.val_names``):
  "holdout": closed-set top-1 and top-5 over all N classes (plain logits, chunked,
  ``classifier.topk``);
  each .bin set: embeddings f(x) (+ f(flip x) when ``validation.flip``, which defaults to
  ``data.flip``) of the 2P images -> 10-fold verification
  accuracy (``metrics.verification_metrics``), logged as ``val/<name>/acc`` etc.

The classifier (``build_classifier``): ``SampledClassifier`` (rows split by class over the
ranks under DDP), or ``DenseClassifier`` for ``sampler=full``. The checkpoint holds
backbone, W, momentum (``classifier.*``), optimizer, scheduler, the
sampler's RNG/counters and the full resolved cfg (``hyper_parameters["cfg"]``) so
``evaluate.py`` can rebuild the backbone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from hf_softmax.evaluation.embed import flip_embed
from hf_softmax.schedule import seed_epoch
from hf_softmax.validation import ValidationEpoch

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """A NaN/Inf loss or classifier row; the message names the step and the sampler state."""


def resolve_cfg(cfg: Mapping | DictConfig) -> dict[str, Any]:
    """Full cfg -> plain dict with interpolations resolved (the ``hydra`` node is dropped).

    Keys whose interpolations cannot be resolved here (``${hydra:...}`` outside a Hydra run)
    are kept unresolved instead of failing.
    """
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    out: dict[str, Any] = {}
    for key in node:
        if key == "hydra":
            continue
        try:
            value = node[key]
            out[key] = (
                OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            )
        except Exception:  # e.g. ${hydra:runtime.output_dir} without a Hydra run
            out[key] = OmegaConf.to_container(node, resolve=False)[key]
    return out


class HFSoftmaxModule(pl.LightningModule):
    """Backbone + classifier trained with manual optimisation; built objects in.

    backbone: images (B, C, H, W) -> features (B, D). classifier: a ``SampledClassifier`` (one
    rank or class-sharded over many) or a ``DenseClassifier`` over N rows
    (``hf_softmax.build.build_classifier``).
    optimizer: a partial called with the trainable parameters (``conf/optim``); scheduler: a
    partial called with (optimizer, estimated_steps, steps_per_epoch) (``conf/scheduler``;
    estimated_steps is a callable: asking the trainer sets up the train loader).
    config: the resolved train config, saved as ``hyper_parameters["cfg"]`` with
    ``num_classes`` so that ``evaluate.py`` and ``build.module_from_checkpoint`` rebuild it.
    """

    def __init__(
        self,
        backbone: nn.Module,
        classifier: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler],
        *,
        seed: int = 0,
        grad_clip: float | None = None,
        skip_nonfinite: bool = False,
        val_flip: bool = True,
        val_nfolds: int = 10,
        acc_full_every: int = 0,
        predict_chunk: int = 65536,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.num_classes = int(classifier.num_classes)
        if config is not None:
            self.save_hyperparameters({"cfg": resolve_cfg(config), "num_classes": self.num_classes})
        self.seed = int(seed)
        self.backbone = backbone
        self.classifier = classifier
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.nonfinite_skipped = 0
        self.last_saved_step: int | None = None  # global step of the newest checkpoint written
        self.val_flip = bool(val_flip)
        self.acc_full_every = int(acc_full_every)
        self.val_nfolds = int(val_nfolds)
        self.predict_chunk = int(predict_chunk)
        self._last_step_time: float | None = None
        self._val = ValidationEpoch(self.val_nfolds)

    def setup(self, stage: str) -> None:
        """Ask the DataModule (one with a ``lookahead`` attribute) for the next batch's labels
        with each batch when the classifier selects ahead (``classifier.prefetch``)."""
        dm = getattr(self.trainer, "datamodule", None)
        ahead = getattr(self.classifier, "selects_ahead", None)
        if stage == "fit" and dm is not None and hasattr(dm, "lookahead") and ahead is not None:
            dm.lookahead = bool(ahead(self.trainer.strategy.root_device))

    # -- placement -------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.classifier.place(self.device)

    def on_validation_start(self) -> None:
        self.classifier.place(self.device)

    def on_test_start(self) -> None:
        self.classifier.place(self.device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> embeddings (B, D); C = model.in_channels."""
        return self.backbone(images)

    # -- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        opt = self.optimizer_factory(params)

        def estimated() -> int:  # sets up the train loader: only asked for when needed
            return int(self.trainer.estimated_stepping_batches)

        def per_epoch(total: int) -> int:
            batches = self.trainer.num_training_batches
            if not batches or batches == float("inf"):  # loader not set up yet
                return max(1, total // max(1, int(self.trainer.max_epochs or 1)))
            return int(batches)

        sched = self.scheduler_factory(opt, estimated_steps=estimated, steps_per_epoch=per_epoch)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _sampler_state(self) -> str:
        s = self.classifier.sampler
        return (
            f"sampler {s.name!r} (M={s.num}, N={s.num_classes}, metric={s.metric}, "
            f"has_index={getattr(s, 'has_index', None)}, selects={getattr(s, 'num_selects', '?')}, "
            f"swaps={getattr(s, 'num_swaps', '?')})"
        )

    def _nonfinite(self, what: str, batch_idx: int) -> None:
        msg = (
            f"non-finite {what} at global step {self.global_step} (epoch {self.current_epoch}, "
            f"batch {batch_idx}); {self._sampler_state()}"
        )
        if not self.skip_nonfinite:
            raise NonFiniteError(msg + "; set skip_nonfinite=true to skip such steps")
        self.nonfinite_skipped += 1
        log.warning("%s: step skipped (%d so far)", msg, self.nonfinite_skipped)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor] | None:
        images, labels = batch[0], batch[1]
        step = self.global_step  # before this step's optimizer.step()
        opt = self.optimizers()
        sched = self.lr_schedulers()
        lr = float(opt.param_groups[0]["lr"])  # this step's lr, shared with the sparse rows
        features = self.backbone(images)  # (B, D)
        ahead = batch[2] if len(batch) > 2 else None  # the next batch's labels (lookahead)
        if ahead is not None and getattr(self.classifier, "selects_ahead", None) is not None:
            out = self.classifier(features, labels, torch.as_tensor(ahead))
        else:
            out = self.classifier(features, labels)
        loss = out.loss
        if not bool(torch.isfinite(loss)):
            self._nonfinite(f"loss ({float(loss)})", batch_idx)
            opt.zero_grad(set_to_none=True)
            self.log("train/nonfinite_skipped", float(self.nonfinite_skipped))
            return None
        bsz = int(labels.shape[0])
        if self.acc_full_every and step % self.acc_full_every == 0:
            # all N rows, before this step's update (the rows the loss saw); collective
            # when sharded, and every rank reaches it on the same steps
            pred = self.classifier.predict(features.detach(), chunk_size=self.predict_chunk)
            acc_full = (pred.to(labels.device) == labels).float().mean()
            self.log("train/acc_full", acc_full, on_step=True, on_epoch=False, batch_size=bsz)
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.grad_clip:
            self.clip_gradients(
                opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm"
            )
        opt.step()
        self.classifier.step(out, lr)
        sched.step()
        bad = self.classifier.nonfinite_rows(out)
        if bad:
            self._nonfinite(f"classifier rows {bad}", batch_idx)

        now = time.perf_counter()
        acc = out.accuracy  # plain logits within the active set (sharded: over all ranks')
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=bsz)  # fmt: skip
        self.log("train/acc", acc, prog_bar=True, on_step=True, on_epoch=True, batch_size=bsz)
        self.log("lr", lr, on_step=True, on_epoch=False, batch_size=bsz)
        self.log("train/active_size", float(out.active.ids.numel()), on_step=True,
                 on_epoch=False, batch_size=bsz)  # fmt: skip
        if self._last_step_time is not None:
            dt = max(now - self._last_step_time, 1e-9)
            self.log("train/samples_per_s", bsz / dt, on_step=True, on_epoch=False,
                     batch_size=bsz)  # fmt: skip
        self._last_step_time = now
        # for callbacks (recall probe of IndexRebuild) and tests: the features, the active
        # class ids, and the rows the step updated (local ids) with their gradient
        grad = out.rows.grad if out.rows is not None else None
        return {"loss": loss.detach(), "features": features.detach(), "active_ids": out.active.ids,
                "row_ids": out.row_ids, "row_grad": grad}  # fmt: skip

    def on_train_epoch_start(self) -> None:
        self._last_step_time = None  # do not count data-loader start-up as step time
        # The global RNGs (dropout, augmentations drawn in this process) follow (seed, epoch),
        # so an epoch does not depend on history. The loader's order and flips do not use
        # them: RecordDataModule's ResumableSampler derives them from (seed, epoch) and
        # resumes mid-epoch and at epoch boundaries whenever Lightning creates its iterator.
        seed_epoch(self.seed, self.current_epoch)

    # -- validation ------------------------------------------------------------------------
    def _val_name(self, dataloader_idx: int) -> str:
        dm = getattr(self.trainer, "datamodule", None)
        names = list(getattr(dm, "val_names", []) or [])
        return names[dataloader_idx] if dataloader_idx < len(names) else f"val{dataloader_idx}"

    def on_validation_epoch_start(self) -> None:
        self._val = ValidationEpoch(self.val_nfolds)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, second = batch[0], batch[1]
        name = self._val_name(dataloader_idx)
        if name == "holdout":  # second: labels (B,); topk is a collective under DDP
            top = self.classifier.topk(self.backbone(images), 5, self.predict_chunk)
            self._val.add_holdout(name, top, second)
            return
        emb = flip_embed(self.backbone, images, self.val_flip)  # (B, D); second: .bin index (B,)
        self._val.add_embeddings(name, second, emb)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        if self.trainer.world_size <= 1:
            return t
        g = self.all_gather(t.to(self.device))  # (W, n, ...) - DistributedSampler pads to equal n
        return g.reshape(-1, *t.shape[1:]).cpu()

    def on_validation_epoch_end(self) -> None:
        sets = getattr(getattr(self.trainer, "datamodule", None), "verification_sets", {}) or {}
        for key, value, bar in self._val.results(self._gather, sets):
            self.log(key, value, prog_bar=bar)
        self._val = ValidationEpoch(self.val_nfolds)

    # -- checkpoint ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.last_saved_step = int(checkpoint.get("global_step", self.global_step))
        # the sampler's RNG and counters are in the classifier's state dict
        checkpoint["hf_softmax"] = {"nonfinite_skipped": self.nonfinite_skipped}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # older checkpoints also hold "sampler" here: the same state as the classifier's
        state = checkpoint.get("hf_softmax") or {}
        self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
