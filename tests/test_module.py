"""HFSoftmaxModule: real training steps on the tiny MXNet-written .rec (tests/fixtures/mxnet_rec).

Loss goes down, only the active rows move (with torch SGD's update on those rows), the LR
schedule, non-finite handling and what the checkpoint holds.
"""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from data.datamodule import RecordDataModule
from hf_softmax.build import build_module, module_from_checkpoint
from hf_softmax.config_check import check_config
from hf_softmax.dense_classifier import DenseClassifier
from hf_softmax.heads import build_head
from hf_softmax.module import NonFiniteError
from hf_softmax.samplers import build_sampler
from hf_softmax.schedule import WarmupSchedule
from tests.conftest import module_cfg


def make_cfg(sampler: str = "annoy", head: str = "cosface", **optim) -> dict:
    cfg = module_cfg(sampler, head, **optim)
    cfg.head.scale = 16.0  # moderate logits: a few steps on 58 images must show progress
    cfg.sampler.num = 8
    return OmegaConf.to_container(cfg)


@pytest.fixture
def rec_dm(mxnet_rec_dir) -> RecordDataModule:
    dm = RecordDataModule(
        path=str(mxnet_rec_dir), batch_size=8, image_size=32, bins=["pairs"], val_batch_size=16
    )
    dm.prepare_data()
    return dm


class Record(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.active: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.active.append(outputs["active_ids"].clone())


def trainer(steps: int, callbacks=(), **kw) -> pl.Trainer:
    kw.setdefault("limit_val_batches", 0)
    return pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **kw,
    )


def test_loss_decreases_on_tiny_rec(rec_dm):
    from callbacks.index_rebuild import IndexRebuild

    cfg = make_cfg("annoy", lr=0.1)
    cfg["sampler"]["n_jobs"] = 1  # a multi-threaded Annoy build is not deterministic
    pl.seed_everything(0, verbose=False)  # the backbone's initialisation
    module = build_module(cfg, rec_dm.num_classes)
    rec = Record()
    # 58 images, 19 classes, batch 8: 7 steps per epoch, 6 epochs
    trainer(-1, [rec, IndexRebuild(interval=5)], max_epochs=6).fit(module, datamodule=rec_dm)
    assert len(rec.losses) == 42
    first, last = sum(rec.losses[:7]) / 7, sum(rec.losses[-7:]) / 7
    assert last < 0.8 * first, rec.losses


def test_only_active_rows_move_like_torch_sgd(rec_dm):
    module = build_module(make_cfg("random", momentum=0.0, weight_decay=0.0),
                             rec_dm.num_classes)  # fmt: skip
    w0 = module.classifier.weight.clone()
    grads = {}

    class Grab(pl.Callback):  # the rows the step updated and their gradient
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            grads["ids"], grads["g"] = outputs["row_ids"].clone(), outputs["row_grad"].clone()

    rec = Record()
    trainer(1, [rec, Grab()]).fit(module, datamodule=rec_dm)
    w1 = module.classifier.weight
    moved = torch.nonzero((w1 != w0).any(dim=1)).view(-1)
    active = rec.active[0]
    assert active.numel() == 8
    assert set(moved.tolist()) <= set(active.tolist())  # untouched rows wait (lazy)
    assert len(moved) > 0
    # plain SGD on the active rows with the schedule's lr (no momentum / wd here)
    expected = w0[grads["ids"]] - 0.05 * grads["g"]
    torch.testing.assert_close(w1[grads["ids"]], expected)


def test_validation_metrics(rec_dm):
    rec_dm.val_fraction = 0.0
    module = build_module(make_cfg("exact"), rec_dm.num_classes)
    t = trainer(2, limit_val_batches=1.0, limit_train_batches=2, max_epochs=1)
    t.fit(module, datamodule=rec_dm)
    metrics = t.callback_metrics
    assert 0.0 <= float(metrics["val/pairs/acc"]) <= 1.0
    assert {"val/pairs/acc_std", "val/pairs/auc", "val/pairs/tar@far=1e-3"} <= set(metrics)


def test_holdout_top1_uses_predict_over_all_classes(rec_dm):
    module = build_module(make_cfg("random"), rec_dm.num_classes)
    images = torch.randn(4, 3, 32, 32)
    feats = module.backbone.eval()(images)
    w = module.classifier.weight
    cos = torch.nn.functional.normalize(feats) @ torch.nn.functional.normalize(w).t()
    assert torch.equal(module.classifier.predict(feats, chunk_size=5), cos.argmax(1))


def test_accuracy_is_plain_top1_not_margin():
    """CosFace: an image of class 0 whose near-duplicate row 1 (cos 0.995) beats the target
    once the margin is taken off it. Plain top-1 gets it right; the margin logits do not."""
    head = build_head("cosface", scale=64.0, margin=0.4)
    clf = DenseClassifier(4, 8, head, build_sampler({"name": "full", "num": 4}, 4, head.metric))
    w = torch.eye(4, 8)
    w[1] = w[0] + 0.1 * torch.eye(8)[1]
    with torch.no_grad():
        clf.weight.copy_(w)
    labels = torch.tensor([0, 2, 3])
    out = clf(w[labels].clone(), labels)
    plain = head.plain_logits(w[labels], w)  # by hand: s * cos, no margin
    assert float(out.accuracy) == float((plain.argmax(1) == labels).float().mean()) == 1.0
    margin_acc = float((out.logits.argmax(1) == out.targets).float().mean())
    assert margin_acc == pytest.approx(2 / 3)  # what train/acc used to log


def test_train_acc_and_acc_full_by_hand(rec_dm):
    """train/acc: plain top-1 within the active set; train/acc_full: over all N rows (lr 0, so
    the rows after the step are the rows the step scored)."""
    cfg = make_cfg("random", lr=0.0)
    cfg["validation"]["acc_full_every"] = 2
    module = build_module(cfg, rec_dm.num_classes)
    logged: dict[str, list[float]] = {}
    log = module.log

    def record(name, value, *args, **kw):
        logged.setdefault(name, []).append(float(value))
        return log(name, value, *args, **kw)

    module.log = record
    want: dict[str, list[float]] = {"train/acc": [], "train/acc_full": []}

    class Hand(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            feats, ids, labels = outputs["features"], outputs["active_ids"], batch[1]
            w, head = pl_module.classifier.weight, pl_module.classifier.head
            targets = torch.stack([torch.nonzero(ids == y)[0, 0] for y in labels])
            plain = head.plain_logits(feats, w[ids]).argmax(1)
            want["train/acc"].append(float((plain == targets).float().mean()))
            if batch_idx % 2 == 0:
                full = head.plain_logits(feats, w).argmax(1)
                want["train/acc_full"].append(float((full == labels).float().mean()))

    trainer(4, [Hand()], max_epochs=1).fit(module, datamodule=rec_dm)
    assert len(want["train/acc"]) == 4 and len(want["train/acc_full"]) == 2
    for key, values in want.items():
        assert logged[key] == pytest.approx(values), key


def test_nonfinite_loss_stops_naming_step_and_sampler(rec_dm):
    module = build_module(make_cfg("random"), rec_dm.num_classes)
    module.classifier.weight[:] = float("nan")
    with pytest.raises(NonFiniteError, match=r"global step 0 .*sampler 'random'"):
        trainer(3).fit(module, datamodule=rec_dm)


def test_skip_nonfinite_counts(rec_dm):
    cfg = make_cfg("random")
    cfg["skip_nonfinite"] = True
    module = build_module(cfg, rec_dm.num_classes)
    module.classifier.weight[:] = float("inf")
    trainer(2, max_epochs=1, limit_train_batches=2).fit(module, datamodule=rec_dm)
    assert module.nonfinite_skipped == 2


def test_warmup_cosine_step_schedules():
    s = WarmupSchedule(total_steps=110, warmup_steps=10, warmup_start_factor=0.0,
                       schedule="cosine", min_lr_factor=0.1)  # fmt: skip
    assert s(0) == 0.0 and s(5) == pytest.approx(0.5) and s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    st = WarmupSchedule(total_steps=100, schedule="step", milestones=[20, 50], gamma=0.1)
    assert [st(0), st(19), st(20), st(49), st(50)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_row_step_uses_scheduled_lr(rec_dm):
    cfg = make_cfg("random", momentum=0.0, weight_decay=0.0, warmup_steps=4,
                   warmup_start_factor=0.25, schedule="constant")  # fmt: skip
    module = build_module(cfg, rec_dm.num_classes)
    seen = []

    class Grab(pl.Callback):
        def on_after_backward(self, trainer, pl_module):
            seen.append(pl_module.classifier.weight.clone())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ids, g, w_before = outputs["row_ids"], outputs["row_grad"], seen[-1]
            lr = 0.05 * (0.25 + 0.75 * batch_idx / 4)
            torch.testing.assert_close(pl_module.classifier.weight[ids], w_before[ids] - lr * g)

    trainer(2, [Grab()], max_epochs=1, limit_train_batches=2).fit(module, datamodule=rec_dm)
    assert len(seen) == 2


def test_checkpoint_holds_cfg_backbone_and_classifier(rec_dm, tmp_path):
    cfg = make_cfg("annoy")
    module = build_module(cfg, rec_dm.num_classes)
    t = trainer(2, default_root_dir=tmp_path)
    t.fit(module, datamodule=rec_dm)
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["hyper_parameters"]["cfg"]["model"] == cfg["model"]
    keys = set(ckpt["state_dict"])
    assert {"classifier.weight", "classifier.momentum"} <= keys
    assert any(k.startswith("backbone.") for k in keys)
    loaded = module_from_checkpoint(path)
    torch.testing.assert_close(loaded.classifier.weight, module.classifier.weight)
    torch.testing.assert_close(
        loaded.classifier.store.momentum_buffer, module.classifier.store.momentum_buffer
    )
    assert loaded.classifier.sampler.state_dict()["num_selects"] == 2


def test_check_config_errors():
    cfg = make_cfg("annoy")
    with pytest.raises(ValueError, match=r"exceeds the number of classes N = 5"):
        check_config(cfg, num_classes=5)
    bad = make_cfg("annoy")
    bad["callbacks"] = {"index_rebuild": {"interval": 0}}
    with pytest.raises(ValueError, match="callbacks.index_rebuild.interval must be >= 1"):
        check_config(bad)
    bad = make_cfg("annoy")
    bad["sampler"]["_target_"] = "hf_softmax.samplers.lsh.LSHSampler"
    with pytest.raises(
        ValueError, match=r"unknown sampler 'hf_softmax.samplers.lsh.LSHSampler'.*annoy"
    ):
        check_config(bad)
    bad = make_cfg("annoy")
    bad["model"]["name"] = "resnet9000"
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet9000'.*iresnet50"):
        check_config(bad)
    check_config(make_cfg("full"), num_classes=5)  # dense: M is unused
