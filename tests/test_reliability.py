"""Crash safety: a real SIGKILL in the middle of an epoch, then ``train.py ckpt_path=last``,
continues exactly like a run that never stopped (same batches, flips, losses, classifier rows,
momentum and optimizer state); the training loader resumes mid-epoch for any num_workers.

Already covered elsewhere (not repeated here): a kill during checkpoint writes and atomic
writes (tests/test_train.py), epoch-boundary resume (tests/test_train.py), NaN/Inf loss stop and
skip_nonfinite (tests/test_module.py), failing background index builds
(tests/test_index_rebuild.py), RecordIO fuzzing (tests/test_recordio_fuzz.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from data.datamodule import RecordDataModule, ResumableDataLoader, ResumableSampler
from tests.conftest import step_losses

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 8  # 64 classes x 4 images, batch 32
EVERY = 3  # step checkpoints: 3, 6, 9, ... never at an epoch boundary before step 24
LAST = 15  # steps of a run (the LR schedule is 16 steps long)

# As tests/test_train.py's TINY, plus step checkpoints and synchronous index builds. The index
# is never checkpointed: a resumed run rebuilds it from the checkpoint's weights, which equals
# the uninterrupted run's index only at rebuild steps, so checkpoints fall on rebuild steps.
TINY = [
    "data.demo_kwargs.num_classes=64",
    "data.demo_kwargs.images_per_class=4",
    "data.demo_kwargs.num_pairs=40",
    "+data.demo_kwargs.num_unseen=16",
    "+data.demo_kwargs.images_per_unseen=4",
    "data.batch_size=32",
    "data.val_fraction=0.0",  # all 256 images train: 8 steps per epoch
    "model.embedding_dim=32",
    "sampler.num=48",
    f"callbacks.index_rebuild.interval={EVERY}",
    "callbacks.index_rebuild.probe_every=0",
    "callbacks.index_rebuild.background=false",
    "scheduler.warmup_steps=2",
    "scheduler.total_steps=16",
    "trainer.max_epochs=2",
    f"trainer.max_steps={LAST}",  # a step checkpoint (last.ckpt) at the very end
    "trainer.limit_val_batches=0",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "logger=csv",
    "callbacks.model_checkpoint.every_n_epochs=null",
    f"callbacks.model_checkpoint.every_n_train_steps={EVERY}",
    "torch_threads=1",
]


class Throttle(pl.Callback):
    """Sleeps after every step so that a test can kill the run mid-epoch (timing only)."""

    def __init__(self, seconds: float = 0.3) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("demo_cache")
    return {
        **os.environ,
        "HF_SOFTMAX_CACHE": str(cache),
        "WANDB_MODE": "offline",
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }


def train_cmd(run_dir: Path, runs_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "train.py", *TINY, f"hydra.run.dir={run_dir}",
            f"paths.runs_dir={runs_dir}", *extra]  # fmt: skip


def newest_step_checkpoint(run_dir: Path) -> int:
    steps = [int(p.stem.split("step")[-1]) for p in (run_dir / "checkpoints").glob("*step*.ckpt")]
    return max(steps, default=-1)


@pytest.fixture(scope="module")
def demo_dm(env) -> RecordDataModule:
    demo = {"num_classes": 16, "images_per_class": 4, "num_pairs": 40, "num_unseen": 16,
            "images_per_unseen": 4, "root": str(Path(env["HF_SOFTMAX_CACHE"]) / "dm")}  # fmt: skip
    dm = RecordDataModule(demo=True, batch_size=32, image_size=32, demo_kwargs=demo)
    dm.setup("fit")
    return dm


def batches(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_mid_epoch_with_the_same_batches_and_flips(demo_dm, workers):
    demo_dm.batch_size, demo_dm.num_workers = 8, workers
    ref = demo_dm.train_dataloader()
    assert isinstance(ref, ResumableDataLoader) and len(ref) == 8
    epoch0 = batches(ref, 0)
    epoch1 = batches(ref, 1)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(epoch0, epoch1, strict=True))
    # what a checkpoint after 3 batches of epoch 1 holds; in training the DataModule counts
    # the trainer's processed batches (workers and Lightning fetch ahead of training)
    it = iter(ref)
    for _ in range(3):
        next(it)
    ref.sampler.progress = lambda: 3 * 8
    state = ref.state_dict()
    assert state == {"epoch": 1, "seed": 0, "consumed": 24, "num_samples": 64, "num_replicas": 1}
    fresh = RecordDataModule(**{k: getattr(demo_dm, k) for k in ("demo", "demo_kwargs")},
                             batch_size=8, image_size=32, num_workers=workers)  # fmt: skip
    loader = fresh.train_dataloader()
    loader.load_state_dict(state)
    rest = list(loader)  # the resumed epoch: its last 5 batches, same images, labels and flips
    assert len(rest) == 5
    for (x, y), (rx, ry) in zip(rest, epoch1[3:], strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert torch.equal(batches(loader, 2)[0][0], batches(ref, 2)[0][0])  # next epoch from 0


def test_sampler_shards_by_rank_and_resumes_each_shard():
    data = list(range(10))
    ranks = [ResumableSampler(data, seed=3, num_replicas=2, rank=r) for r in range(2)]
    for s in ranks:
        s.set_epoch(4)
    shards = [list(s) for s in ranks]
    ids = [i for shard in shards for i, _ in shard]
    assert sorted(ids) == data  # 5 each, disjoint, the same permutation as DistributedSampler
    ref = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=1, seed=3)
    ref.set_epoch(4)
    assert [i for i, _ in shards[1]] == list(ref)
    flips = np.array([[f for _, f in shard] for shard in shards])
    assert flips.any() and not flips.all()
    for r, s in enumerate(ranks):
        again = ResumableSampler(data, seed=3, num_replicas=2, rank=r)
        again.load_state_dict({**s.state_dict(), "consumed": 2})
        assert list(again) == shards[r][2:]
        assert len(list(again)) == 5  # only the resumed pass skips


def test_checkpoint_from_other_data_restarts_the_epoch(caplog):
    sampler = ResumableSampler(list(range(10)), seed=1)
    state = {"epoch": 2, "seed": 1, "consumed": 4, "num_samples": 10, "num_replicas": 2}
    sampler.load_state_dict(state)
    assert len(list(sampler)) == 10
    assert "num_replicas" in caplog.text and "restarts from its first batch" in caplog.text


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, env):
    runs = tmp_path / "runs"
    # the reference: 2 epochs without interruption (first run also generates the demo data)
    full = tmp_path / "full"
    res = subprocess.run(train_cmd(full, tmp_path / "none"), cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]

    killed = runs / "killed"  # decoding in 2 workers: the batches must not depend on it
    cmd = train_cmd(killed, runs, "data.num_workers=2",
                    "+callbacks.throttle._target_=test_reliability.Throttle")  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        while newest_step_checkpoint(killed) < 2 * EVERY and proc.poll() is None:
            assert time.time() < deadline, "no step checkpoint beyond the first in time"
            time.sleep(0.02)
        assert proc.poll() is None, "run ended before it could be killed: " + proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    saved = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    start = int(saved["global_step"])
    assert start < LAST and start % STEPS_PER_EPOCH != 0  # really a mid-epoch checkpoint
    loader_state = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state["consumed"] == (start % STEPS_PER_EPOCH) * 32

    resumed = runs / "resumed"
    res = subprocess.run(train_cmd(resumed, runs, "ckpt_path=last"), cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "not resumable" not in res.stderr  # Lightning's warning for non-stateful loaders

    a, b = step_losses(full), step_losses(resumed)
    assert sorted(a) == list(range(LAST))
    assert sorted(b) == list(range(start, LAST))  # continued at the checkpoint, not an epoch start
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)
    end_a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    end_b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert end_a["global_step"] == end_b["global_step"] == LAST
    assert end_a["state_dict"].keys() == end_b["state_dict"].keys()
    for key in ("classifier.weight", *end_a["state_dict"]):  # momentum too, where kept
        torch.testing.assert_close(end_b["state_dict"][key], end_a["state_dict"][key],
                                   rtol=1e-5, atol=1e-6, msg=key)  # fmt: skip
    mom_a = end_a["optimizer_states"][0]["state"]
    mom_b = end_b["optimizer_states"][0]["state"]
    assert mom_a.keys() == mom_b.keys()
    for i in mom_a:
        torch.testing.assert_close(mom_b[i]["momentum_buffer"], mom_a[i]["momentum_buffer"],
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
    for key in ("classifier.sampler_rng", "classifier.sampler_counters"):  # the sampler's state
        assert torch.equal(end_b["state_dict"][key], end_a["state_dict"][key]), key


def test_nonfinite_weight_row_with_finite_loss_stops_naming_rows_step_and_sampler(demo_dm):
    """tests/test_module.py covers a NaN loss and skip_nonfinite; here the loss is finite and
    only the sparse update makes one classifier row non-finite (an Inf momentum entry)."""
    from hydra import compose, initialize_config_dir

    from hf_softmax.build import build_module
    from hf_softmax.module import NonFiniteError

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["sampler=random", "sampler.num=16", "data.batch_size=8",
                                          "model.embedding_dim=32",
                                          "classifier.row_momentum=lazy"])  # fmt: skip
    demo_dm.batch_size, demo_dm.num_workers = 8, 0
    module = build_module(cfg, demo_dm.num_classes)  # all 16 rows active every step
    with torch.no_grad():
        module.classifier.store.momentum_buffer[5] = float("inf")
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)  # fmt: skip
    with pytest.raises(NonFiniteError, match=r"classifier rows \[5\] at global step \d .*'random'"):
        trainer.fit(module, datamodule=demo_dm)
