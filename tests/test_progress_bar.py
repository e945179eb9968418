"""The training progress bar shows the per-step train/loss and train/acc under their logged
names, the previous epoch's train/acc_epoch and validation numbers; no logger version."""

from pytorch_lightning.callbacks import TQDMProgressBar

from callbacks import TrainingProgressBar


def test_bar_drops_version_and_step_suffix(monkeypatch):
    shown = {
        "v_num": "ab_0",
        "train/loss_step": 27.1,
        "train/acc_step": 0.42,
        "train/loss_epoch": 28.0,
        "train/acc_epoch": 0.33,
        "val/holdout/top1": 0.17,
        "val/pairs/acc": 0.78,
    }
    monkeypatch.setattr(TQDMProgressBar, "get_metrics", lambda self, trainer, module: dict(shown))
    assert TrainingProgressBar(refresh_rate=5).get_metrics(None, None) == {
        "train/loss": 27.1,
        "train/acc": 0.42,
        "train/acc_epoch": 0.33,
        "val/holdout/top1": 0.17,
        "val/pairs/acc": 0.78,
    }
