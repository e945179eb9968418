"""train.py end to end on a tiny demo: fast_dev_run per sampler, a real -m multirun, resume
equivalence (at an epoch boundary), ckpt_path=last and crash-safe checkpoint writes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from hf_softmax.build import module_from_checkpoint
from hf_softmax.checkpoint_io import AtomicCheckpointIO
from hf_softmax.sweep import write_summary
from tests.conftest import step_losses

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train as train_script  # noqa: E402

# 64 classes x 4 images (batch 32: 8 steps per epoch), 40 pairs of 16 unseen identities
TINY = [
    "data.demo_kwargs.num_classes=64",
    "data.demo_kwargs.images_per_class=4",
    "data.demo_kwargs.num_pairs=40",
    "+data.demo_kwargs.num_unseen=16",
    "+data.demo_kwargs.images_per_unseen=4",
    "data.batch_size=32",
    "data.val_batch_size=64",
    "model.embedding_dim=32",
    "sampler.num=48",
    "callbacks.index_rebuild.interval=4",
    "callbacks.index_rebuild.probe_every=4",
    "scheduler.warmup_steps=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "torch_threads=null",  # the demo experiment's 1 thread would stick to the test process
]


pytestmark = pytest.mark.usefixtures("demo_cache")  # tests/conftest.py


def compose_cfg(overrides: list[str], output_dir: Path, runs_dir: Path | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=TINY + overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.runs_dir = str(runs_dir or output_dir.parent)
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


# final_metrics.json of a run with holdout images (the demo's data.val_fraction) and pairs.bin
FINAL_KEYS = {
    "val/pairs/acc",
    "val/holdout/top1",
    "val/holdout/top5",
    "train/acc",
    "train/acc_full",
    "steps",
    "wall_s",
    "optimized_metric",
}


# every conf/sampler/*.yaml: adding a sampler (one file + one YAML) needs no change here
SAMPLERS = sorted(p.stem for p in (REPO / "conf" / "sampler").glob("*.yaml"))
STEPS = 3


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_trains_a_few_steps(sampler, tmp_path, capsys):
    """The real composed config (hydra.compose) of each sampler YAML trains STEPS steps."""
    cfg = compose_cfg(
        [f"sampler={sampler}", f"trainer.fast_dev_run={STEPS}", "logger=csv"], tmp_path
    )
    value = train_script.train(cfg)
    assert 0.0 <= value <= 1.0  # verification accuracy on the pairs of the first val batch
    out = capsys.readouterr().out
    assert "final val/pairs/acc" in out
    # the final summary: printed and in final_metrics.json (what sweep summaries tabulate)
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert set(final) == FINAL_KEYS
    assert final["optimized_metric"] == "val/pairs/acc" and final["steps"] == STEPS
    for key in FINAL_KEYS - {"optimized_metric", "steps", "wall_s"}:
        assert 0.0 <= final[key] <= 1.0, key
    assert final["val/pairs/acc"] == pytest.approx(value)
    assert f"final metrics -> {tmp_path / 'final_metrics.json'}" in out
    assert "closed-set top-1 (held-out images, all classes)" in out
    ckpt = Path(next(ln for ln in out.splitlines() if ln.startswith("checkpoint: "))[12:])
    assert ckpt.parent == tmp_path / "checkpoints" and ckpt.is_file()
    module = module_from_checkpoint(ckpt)
    assert module.classifier.sampler.name == sampler
    saved = torch.load(ckpt, weights_only=True)["hyper_parameters"]["cfg"]
    assert saved["sampler"]["_target_"] == cfg.sampler._target_


# label-driven selection, selected ahead from the loader's lookahead (classifier.prefetch)
LABEL_AHEAD = ["sampler=exact", "sampler.query=label", "sampler.table_k=4",
               "classifier.prefetch=true"]  # fmt: skip


# label mode with a share of per-feature queries: selected in the step (prefetch asks, in vain)
MIXED = LABEL_AHEAD + ["sampler.feature_share=0.5"]


@pytest.mark.parametrize("mode", [[], LABEL_AHEAD, MIXED], ids=["feature", "label_ahead", "mixed"])
def test_resume_equals_uninterrupted(tmp_path, mode):
    """K steps + resume + K steps == 2K steps (K = one epoch: Lightning resumes map-style data
    at epoch boundaries; the module reseeds data order and flips from (seed, epoch))."""
    common = mode + [
        "logger=csv",
        "callbacks.index_rebuild.background=false",
        "trainer.limit_val_batches=0",
        "data.val_fraction=0.0",  # all 256 images train: 8 steps per epoch
        "scheduler.total_steps=16",
    ]  # the same LR schedule whether max_epochs is 1 or 2
    full = tmp_path / "full"
    train_script.train(compose_cfg(common + ["trainer.max_epochs=2"], full))
    runs = tmp_path / "runs"
    first = runs / "first"
    train_script.train(compose_cfg(common + ["trainer.max_epochs=1"], first))
    assert (first / "checkpoints" / "last.ckpt").is_file()
    second = runs / "second"
    train_script.train(
        compose_cfg(common + ["trainer.max_epochs=2", "ckpt_path=last"], second, runs)
    )
    a = step_losses(full)
    b = {**step_losses(first), **step_losses(second)}
    assert sorted(a) == sorted(b) == list(range(16))
    for step in range(16):
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-4), (step, a, b)
    # and the resumed run really started at step 8 from the checkpoint
    assert min(step_losses(second)) == 8
    ckpt = torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 16 and ckpt["callbacks"]["IndexRebuild"]["builds"] >= 4


def test_ckpt_path_resolution(tmp_path):
    old = tmp_path / "runs" / "a" / "checkpoints" / "last.ckpt"
    new = tmp_path / "runs" / "b" / "checkpoints" / "last.ckpt"
    for p in (old, new):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
    os.utime(old, (1, 1))
    here = tmp_path / "runs" / "c"
    assert train_script.resolve_ckpt_path("last", here, tmp_path / "runs") == str(new)
    assert train_script.resolve_ckpt_path(None, here, tmp_path / "runs") is None
    assert train_script.resolve_ckpt_path("last", here, tmp_path / "none") is None
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        train_script.resolve_ckpt_path(str(tmp_path / "nope.ckpt"), here, None)


def test_atomic_write_keeps_old_checkpoint_on_failure(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"w": torch.ones(3)}, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises
        io.save_checkpoint({"w": torch.zeros(3), "bad": lambda: 0}, path)
    torch.testing.assert_close(io.load_checkpoint(path)["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp files left


def test_sigkill_during_checkpoint_writes_leaves_loadable_file(tmp_path):
    path = tmp_path / "last.ckpt"
    script = textwrap.dedent(
        f"""
        import torch
        from hf_softmax.checkpoint_io import atomic_torch_save
        i = 0
        while True:
            i += 1
            atomic_torch_save({{"i": i, "w": torch.full((4_000_000,), float(i))}}, {str(path)!r})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.time() + 60
        while not path.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.7)  # several writes in flight
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["i"] >= 1 and bool((ckpt["w"] == float(ckpt["i"])).all())


def test_multirun_writes_sweep_summary(tmp_path, demo_cache):
    sweep = tmp_path / "multirun"
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "sampler=annoy",
        "sampler.ntrees=2,4",
        *TINY,
        "logger=none",
        "trainer.max_steps=3",
        "trainer.limit_val_batches=1",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "HF_SOFTMAX_CACHE": demo_cache, "WANDB_MODE": "offline"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (sweep / "0" / "job_result.json").is_file() and (
        sweep / "1" / "job_result.json"
    ).is_file()
    table = (sweep / "summary.md").read_text()
    assert "sampler.ntrees=2" in table and "sampler.ntrees=4" in table
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert all(0.0 <= float(r["verification_acc"]) <= 1.0 for r in rows)
    # every job's final_metrics.json side by side, numbers as the job wrote them
    columns = sorted(FINAL_KEYS - {"optimized_metric"})
    assert set(columns) <= set(rows[0])
    for r in rows:
        final = json.loads((Path(r["output_dir"]) / "final_metrics.json").read_text())
        assert [float(r[c]) for c in columns] == [float(final[c]) for c in columns]
        assert float(r["verification_acc"]) == float(final["val/pairs/acc"])
        assert final["steps"] == 3
    header = table.splitlines()[0]
    assert all(f" {c} " in header for c in columns)
    # the summary can be rebuilt from the job files alone
    assert len(write_summary(sweep, "verification_acc")) == 2


def test_sweep_summary_tabulates_final_metrics(tmp_path):
    """One column per final_metrics.json key (union over the jobs, in the order written); a
    job_result.json from before final_metrics existed still reads, with empty cells."""
    jobs = {
        0: ["sampler=annoy"],
        1: ["sampler=random"],
        2: ["sampler=hnsw"],
    }
    finals = {
        0: {"val/pairs/acc": 0.78, "val/holdout/top1": 0.175, "steps": 280, "wall_s": 156.4},
        1: {"val/pairs/acc": 0.795, "val/holdout/top1": 0.1555, "steps": 280, "wall_s": 162.0},
    }
    for num, overrides in jobs.items():
        out = tmp_path / str(num)
        out.mkdir()
        result = {
            "num": num,
            "overrides": overrides,
            "status": "completed",
            "metric": finals.get(num, {}).get("val/pairs/acc", 0.5),
            "output_dir": str(out),
        }
        if num in finals:
            result["final"] = finals[num]
        (out / "job_result.json").write_text(json.dumps(result))
    write_summary(tmp_path, "verification_acc")
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert list(rows[0])[:7] == ["job", "overrides", "verification_acc", "val/pairs/acc",
                                 "val/holdout/top1", "steps", "wall_s"]  # fmt: skip
    assert rows[1]["val/holdout/top1"] == "0.1555" and rows[2]["val/holdout/top1"] == ""
    lines = (tmp_path / "summary.md").read_text().splitlines()
    assert lines[0] == (
        "| job | overrides | verification_acc | val/pairs/acc | val/holdout/top1 | steps "
        "| wall_s | status |"
    )
    assert lines[2] == (
        "| 0 | `sampler=annoy` | 0.7800 | 0.7800 | 0.1750 | 280 | 156.4 | completed |"
    )
    assert lines[4] == "| 2 | `sampler=hnsw` | 0.5000 |  |  |  |  | completed |"
