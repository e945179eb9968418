"""IndexRebuild (the Lightning adapter of IndexMaintainer) on a real HFSoftmaxModule (tiny
backbone) over a small in-memory dataset.

Schedules, background swaps that never block a step, failing builds, recall probes,
adaptive rebuilds, M schedules (MSchedule), hnsw refresh, checkpointed counters and the
callback state of checkpoints written before the maintainer existed.
"""

from __future__ import annotations

import logging
import threading

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from callbacks.index_rebuild import IndexRebuild
from callbacks.m_schedule import MSchedule
from hf_softmax.build import build_module
from hf_softmax.module import HFSoftmaxModule
from hf_softmax.samplers.annoy import AnnoySampler
from hf_softmax.samplers.exact import exact_topk, recall_at_k
from tests.conftest import module_cfg

NUM_CLASSES = 200
BATCH = 16


def make_cfg(sampler: str = "annoy", **sampler_overrides) -> dict:
    cfg = module_cfg(sampler)
    cfg.sampler.num = 48
    for k, v in sampler_overrides.items():
        cfg.sampler[k] = v
    return OmegaConf.to_container(cfg)


def loader(steps: int, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(steps * BATCH, 3, 16, 16, generator=g)
    labels = torch.randint(NUM_CLASSES, (steps * BATCH,), generator=g)
    return DataLoader(TensorDataset(images, labels), batch_size=BATCH, shuffle=False)


def fit(module, callbacks, steps: int, tmp_path=None, **trainer_kw) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        **trainer_kw,
    )
    trainer.fit(module, train_dataloaders=loader(steps))
    return trainer


class GatedAnnoy(AnnoySampler):
    """A real Annoy index whose builds after the first wait until ``gate`` is set.

    The gate is opened by the training loop itself after some steps: if a step waited for the
    build, the build would never finish (it times out after ``timeout`` and says so).
    """

    def __init__(self, *a, timeout: float = 30.0, **kw):
        super().__init__(*a, **kw)
        self.gate = threading.Event()
        self.timeout = timeout
        self.timed_out = False
        self.calls = 0
        self.build_threads: list[str] = []

    def build_index(self, weights):
        self.calls += 1
        self.build_threads.append(threading.current_thread().name)
        if self.calls > 1 and not self.gate.wait(self.timeout):
            self.timed_out = True
        return super().build_index(weights)


class FailingAnnoy(AnnoySampler):
    """A real Annoy index whose builds number ``fail_on`` raise."""

    def __init__(self, *a, fail_on=(2,), **kw):
        super().__init__(*a, **kw)
        self.fail_on = set(fail_on)
        self.calls = 0

    def build_index(self, weights):
        self.calls += 1
        if self.calls in self.fail_on:
            raise MemoryError(f"simulated failure of build {self.calls}")
        return super().build_index(weights)


def with_sampler(module: HFSoftmaxModule, cls, **kw) -> HFSoftmaxModule:
    old = module.classifier.sampler
    module.classifier.sampler = cls(
        old.num_classes, old.num, metric=old.metric, seed=old.seed, ntrees=4, n_jobs=1, **kw
    )
    return module


def test_interval_schedule_sync():
    module = build_module(make_cfg("annoy"), NUM_CLASSES)
    cb = IndexRebuild(interval=3, background=False)
    fit(module, [cb], steps=10)
    starts = [r.start_step for r in cb.maintainer.history]
    assert starts == [0, 3, 6, 9]  # before the first step, then every 3 global steps
    assert all(r.ok and r.start_step == r.swap_step for r in cb.maintainer.history)
    assert cb.maintainer.builds == 4 and module.classifier.sampler.has_index


def test_background_build_never_blocks_a_step():
    module = with_sampler(build_module(make_cfg("annoy"), NUM_CLASSES), GatedAnnoy)
    sampler = module.classifier.sampler
    cb = IndexRebuild(interval=4, background=True)
    seen = {}

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault("initial", sampler.index)
            if 4 < trainer.global_step < 9:
                # the build started at step 4 is running; the old index serves
                assert cb.maintainer.busy and sampler.index is seen["initial"]
            if trainer.global_step == 9:
                sampler.gate.set()  # only reachable if steps 5..8 did not wait for the build

    trainer = fit(module, [cb, Watch()], steps=14)
    assert trainer.global_step == 14
    assert not sampler.timed_out
    background = [r for r in cb.maintainer.history if r.background]
    assert background and background[0].start_step == 4 and background[0].swap_step >= 9
    assert sampler.build_threads[1].startswith("index-rebuild")  # built off the training thread
    assert sampler.index is not seen["initial"]  # swapped in once done


def test_process_builds_are_swapped_in_and_the_worker_stops_at_the_end():
    module = build_module(make_cfg("annoy", ntrees=4, n_jobs=1), NUM_CLASSES)
    cb = IndexRebuild(interval=2, background="process", build_threads=1, probe_every=0)
    seen = {}

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["worker"] = seen.get("worker") or cb.maintainer.worker
            if trainer.global_step == 3:
                cb.maintainer.wait(3)  # the build started at step 2 swaps in now

    fit(module, [cb, Watch()], steps=5)
    history = cb.maintainer.history
    assert [r.start_step for r in history][:2] == [0, 2] and history[1].ok
    assert history[1].background and history[1].swap_step == 3
    assert cb.maintainer.worker is None and not seen["worker"].pid_alive()


def test_sync_build_runs_inside_the_step():
    module = with_sampler(build_module(make_cfg("annoy"), NUM_CLASSES), GatedAnnoy, timeout=0.2)
    cb = IndexRebuild(interval=4, background=False)
    fit(module, [cb], steps=5)
    sampler = module.classifier.sampler
    assert sampler.timed_out  # nobody could open the gate: the step itself was building
    assert sampler.build_threads[1] == threading.current_thread().name
    assert [r.start_step for r in cb.maintainer.history] == [0, 4]


def test_failing_background_build_keeps_old_index_and_retries(caplog):
    module = with_sampler(build_module(make_cfg("annoy"), NUM_CLASSES), FailingAnnoy,
                          fail_on=(2,))  # fmt: skip
    sampler = module.classifier.sampler
    cb = IndexRebuild(interval=3, background=True)
    seen = {}

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault("initial", sampler.index)
            if cb.maintainer.failures == 1 and "after_failure" not in seen:
                seen["after_failure"] = sampler.index

    with caplog.at_level(logging.ERROR, logger="hf_softmax.index_maintainer"):
        trainer = fit(module, [cb, Watch()], steps=12)
    assert trainer.global_step == 12  # training went on
    assert cb.maintainer.failures == 1
    assert seen["after_failure"] is seen["initial"]  # the old index kept serving
    errors = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(errors) == 1  # logged once, with the traceback
    assert "MemoryError: simulated failure of build 2" in errors[0].getMessage()
    assert "Traceback" in errors[0].getMessage()
    assert cb.maintainer.builds >= 2 and sampler.calls >= 3  # the next interval retried
    assert sampler.index is not seen["initial"]


def test_recall_probe_is_logged_and_matches_reference():
    module = build_module(make_cfg("annoy"), NUM_CLASSES)
    cb = IndexRebuild(interval=100, background=False, probe_every=2, probe_k=5)
    trainer = fit(module, [cb], steps=6)
    assert cb.maintainer.probes == 3
    logged = float(trainer.callback_metrics["index/recall@5"])
    assert 0.0 <= logged <= 1.0 and logged == pytest.approx(cb.maintainer.last_recall)
    # the probe is recall of sampler.query against exact top-k on the same features
    feats = torch.randn(8, 32)
    sampler = module.classifier.sampler
    weights = module.classifier.snapshot_weights(as_selected=True)  # test_index_maintainer
    expected = recall_at_k(sampler.query(feats.numpy(), 5), exact_topk(weights, feats, 5, "cosine"))
    assert cb.maintainer.probe(feats)[0] == pytest.approx(expected)


def test_adaptive_rebuild_when_recall_low():
    module = build_module(make_cfg("annoy"), NUM_CLASSES)
    # min_recall > 1 can never be met: every probe asks for a rebuild
    cb = IndexRebuild(interval=1000, background=False, probe_every=2, adaptive=True,
                      min_recall=1.01)  # fmt: skip
    fit(module, [cb], steps=7)
    assert cb.maintainer.adaptive_triggers == 3
    assert [r.start_step for r in cb.maintainer.history] == [0, 2, 4, 6]


def test_num_schedule_changes_m():
    module = build_module(make_cfg("annoy"), NUM_CLASSES)
    sizes = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sizes.append(int(outputs["active_ids"].numel()))

    fit(module, [IndexRebuild(interval=100), MSchedule({0: 32, 3: 64}), Record()], steps=5)
    assert sizes == [32, 32, 32, 64, 64]


def test_hnsw_refreshes_touched_rows():
    module = build_module(make_cfg("hnsw", num_threads=1), NUM_CLASSES)
    cb = IndexRebuild(interval=2, background=False)
    fit(module, [cb], steps=5)
    kinds = [r.kind for r in cb.maintainer.history]
    assert kinds[0] == "build" and "refresh" in kinds[1:]


@pytest.mark.parametrize("sampler", ["random", "full"])
def test_no_op_without_index(sampler):
    module = build_module(make_cfg(sampler), NUM_CLASSES)
    cb = IndexRebuild(interval=1, background=True, probe_every=1)
    fit(module, [cb], steps=3)
    assert not cb.maintainer.active and cb.maintainer.builds == 0
    assert not cb.maintainer.history and cb.maintainer.probes == 0


def test_counters_in_checkpoint_never_the_index(tmp_path):
    module = build_module(make_cfg("annoy"), NUM_CLASSES)
    cb = IndexRebuild(interval=2, background=False, probe_every=3)
    trainer = fit(module, [cb], steps=5, tmp_path=tmp_path)
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)  # plain tensors and numbers only: no index
    state = ckpt["callbacks"]["IndexRebuild"]
    assert state["builds"] == cb.maintainer.builds == 3 and state["last_build_step"] == 4
    assert state["probes"] == 1
    fresh = IndexRebuild(interval=2)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == pytest.approx(cb.state_dict(), nan_ok=True)
    # after loading, the index is rebuilt on train start (never unpickled)
    resumed = build_module(make_cfg("annoy"), NUM_CLASSES)
    cb2 = IndexRebuild(interval=2, background=False)
    trainer2 = pl.Trainer(accelerator="cpu", max_steps=7, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, limit_val_batches=0, callbacks=[cb2],
                          default_root_dir=tmp_path)  # fmt: skip
    trainer2.fit(resumed, train_dataloaders=loader(7), ckpt_path=path)
    first = cb2.maintainer.history[0]
    assert first.start_step == 5 and first.kind == "build"
    assert cb2.maintainer.builds == 3 + 2  # restored counter + rebuild after resume + step 6


def test_config_errors():
    with pytest.raises(ValueError, match="interval must be >= 1"):
        IndexRebuild(interval=0)
    with pytest.raises(ValueError, match="min_recall"):
        IndexRebuild(adaptive=True, probe_every=5, min_recall=None)
    with pytest.raises(ValueError, match=r"worker_memory must be one of \('keep', 'release'\)"):
        IndexRebuild(worker_memory="free")
    assert IndexRebuild().settings.worker_memory == "keep"


@pytest.mark.parametrize("name", ["auto", "annoy", "full", "ddp"])
def test_legacy_checkpoint_callback_state_loads(name, tmp_path):
    """Checkpoints of the pre-maintainer code (tests/fixtures/legacy_ckpt) keep their counters."""
    from pathlib import Path

    path = Path(__file__).parent / "fixtures" / "legacy_ckpt" / f"{name}.ckpt"
    state = torch.load(path, map_location="cpu", weights_only=False)["callbacks"]["IndexRebuild"]
    cb = IndexRebuild(interval=2, background=False)
    cb.load_state_dict(state)
    assert cb.state_dict() == pytest.approx(state, nan_ok=True)
    if name != "annoy":
        return
    # and a run resumed from it goes on counting from them
    module = build_module(make_cfg("annoy"), NUM_CLASSES)
    cb.on_train_start(pl.Trainer(logger=False, enable_progress_bar=False), module)
    assert cb.maintainer.builds == state["builds"] + 1
    assert cb.maintainer.last_build_step == 0
