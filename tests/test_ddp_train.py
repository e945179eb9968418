"""train.py under Lightning DDP: 2 CPU processes (gloo), class-sharded classifier, then resume in 1.

The 2-process run goes through Lightning's own launcher exactly as a user's
``python train.py trainer=ddp trainer.devices=2`` would (the launcher re-runs the script for
rank 1), on a tiny demo. Its consolidated checkpoint must then resume in a single process
(``trainer=cpu``, plain ``SampledClassifier``) and load for evaluation.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir

from tests.conftest import REPO, TINY_DEMO

DEMO = TINY_DEMO
STEPS = 3  # optimizer steps per epoch and rank


def _overrides(run: Path, demo_root: Path) -> list[str]:
    return [
        f"paths.output_dir={run}",
        f"paths.runs_dir={run}",
        "logger=none",
        "data.batch_size=16",
        "data.val_batch_size=40",
        "model.embedding_dim=32",
        "sampler=annoy",
        "sampler.num=24",  # 12 active classes per rank
        "callbacks.index_rebuild.interval=2",
        "callbacks.index_rebuild.background=false",
        "callbacks.index_rebuild.probe_every=1",
        "scheduler.warmup_steps=0",
        f"+trainer.limit_train_batches={STEPS}",
        "~callbacks.progress_bar",
        "trainer.enable_progress_bar=false",
        *[f"++data.demo_kwargs.{k}={v}" for k, v in {**DEMO, "root": str(demo_root)}.items()],
    ]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("ddp")
    run, demo_root = tmp / "run", tmp / "demo"
    cmd = [
        sys.executable,
        "train.py",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.benchmark=false",
        "trainer.max_epochs=1",
        f"hydra.run.dir={run}",
        *_overrides(run, demo_root),
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {"run": run, "demo_root": demo_root, "stdout": proc.stdout, "stderr": proc.stderr}


def test_two_process_training_writes_consolidated_checkpoint(ddp_run):
    assert "final val/pairs/acc" in ddp_run["stdout"]
    last = ddp_run["run"] / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["global_step"] == STEPS
    state = ckpt["state_dict"]
    assert state["classifier.weight"].shape == (DEMO["num_classes"], 32)
    assert "classifier.momentum" not in state  # row_momentum: immediate keeps none
    # rows of both shards trained: touched spans both halves of the classes
    touched = torch.nonzero(state["classifier.touched"]).view(-1)
    assert touched.min() < DEMO["num_classes"] // 2 <= touched.max()
    assert int(state["classifier.sampler_counters"][0]) == 24  # global M, not a rank's share
    assert "sampler" not in ckpt["hf_softmax"]


def test_two_process_checkpoint_resumes_in_one_process(ddp_run, tmp_path):
    import train
    from hf_softmax.build import module_from_checkpoint
    from hf_softmax.classifier import SampledClassifier

    last = ddp_run["run"] / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False)["state_dict"]
    loaded = module_from_checkpoint(last)  # evaluation path, one process
    torch.testing.assert_close(loaded.classifier.snapshot_weights(),
                               saved["classifier.weight"].numpy())  # fmt: skip

    run = tmp_path / "resume"
    record = tmp_path / "start.pt"
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                "trainer=cpu",
                "trainer.max_epochs=2",
                f"ckpt_path={last}",
                "+callbacks.record._target_=tests.test_ddp_train.StartRecorder",
                f"+callbacks.record.path={record}",
                *_overrides(run, ddp_run["demo_root"]),
            ],
        )
    train.train(cfg)
    seen = torch.load(record, weights_only=False)
    assert seen["classifier"] == SampledClassifier.__name__
    assert seen["start_step"] == STEPS  # continued, not restarted
    torch.testing.assert_close(seen["weight"], saved["classifier.weight"])
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 2 * STEPS


class StartRecorder(pl.Callback):
    """Saves what a run starts from (classifier type, global step, W) to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save(
            {
                "classifier": type(pl_module.classifier).__name__,
                "start_step": trainer.global_step,
                "weight": pl_module.classifier.weight.detach().cpu().clone(),
            },
            self.path,
        )
