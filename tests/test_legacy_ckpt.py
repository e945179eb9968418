"""Checkpoints written before the objects-in redesign (tests/fixtures/legacy_ckpt, commit
bbfe33d) still evaluate to the numbers that code reported, and still resume in train.py;
moved config keys fail with the new key's name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import evaluate as ev
from hf_softmax.build import module_from_checkpoint
from hf_softmax.config_check import check_config
from hf_softmax.config_keys import MovedKeyError, check_overrides, upgrade_config
from hf_softmax.evaluation.checkpoint import load_checkpoint
from tests.conftest import REPO

LEGACY = REPO / "tests" / "fixtures" / "legacy_ckpt"
EXPECTED = json.loads((LEGACY / "expected.json").read_text())
CKPTS = sorted(EXPECTED["checkpoints"])
# the overrides the fixtures were written with (their README), in today's keys
WRITTEN_WITH = [
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=3",
    "data.val_fraction=0.1",
    "data.batch_size=16",
    "sampler.num=16",
    "logger=csv",
    "scheduler.warmup_steps=0",
    "trainer.enable_progress_bar=false",
    "~callbacks.progress_bar",
    "+model.widths=[4,8,8,16]",
    "model.embedding_dim=16",
    "torch_threads=null",
]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    """The demo the fixtures were trained on, regenerated (deterministic) in a tmp root."""
    from data.demo import ensure_demo

    root = tmp_path_factory.mktemp("legacy_demo")
    ensure_demo(root=root, **EXPECTED["demo_kwargs"])
    return root


def _compose(name: str, overrides: list[str], out: Path):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out)
        if "paths" in cfg:
            cfg.paths.output_dir = str(out)
            cfg.paths.runs_dir = str(out)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.mark.parametrize("name", CKPTS)
def test_legacy_checkpoint_evaluates_as_before(name, demo_root, tmp_path):
    from data.demo import demo_dir

    pairs = demo_dir(demo_root, **EXPECTED["demo_kwargs"]) / "pairs.bin"
    cfg = _compose(
        "evaluate",
        [
            f"ckpt={LEGACY / name}",
            f"bins=[{pairs}]",
            "logger=none",
            "plots=false",
            f"out_dir={tmp_path}",
        ],  # fmt: skip
        tmp_path,
    )
    summary = ev.evaluate(cfg)
    got, want = summary["sets"]["pairs"], EXPECTED["checkpoints"][name]
    assert got["acc"] == pytest.approx(want["acc"], abs=1e-6)
    assert got["auc"] == pytest.approx(want["auc"], abs=1e-5)
    assert got["threshold"] == pytest.approx(want["threshold"], abs=1e-4)


@pytest.mark.parametrize("name", CKPTS)
def test_legacy_config_upgrades_and_module_rebuilds(name):
    loaded = load_checkpoint(LEGACY / name)
    cfg = loaded.train_cfg
    assert cfg["sampler"]["_partial_"] is True and "name" not in cfg["sampler"]
    assert "interval" not in cfg["sampler"] and cfg["callbacks"]["index_rebuild"]["interval"] == 20
    assert cfg["optim"]["_target_"] == "torch.optim.SGD" and "warmup_steps" not in cfg["optim"]
    assert cfg["scheduler"]["schedule"] == "cosine"
    check_config(cfg, num_classes=64)
    assert upgrade_config(cfg) == cfg  # current configs pass through
    module = module_from_checkpoint(LEGACY / name)
    ref = torch.load(LEGACY / name, map_location="cpu", weights_only=False)["state_dict"]
    torch.testing.assert_close(module.classifier.weight, ref["classifier.weight"])


def test_legacy_auto_checkpoint_resumes_in_train(demo_root, tmp_path):
    """auto.ckpt (3 steps, epoch 0 done) resumed with train.py for a second epoch of 3 steps."""
    import train

    ckpt = tmp_path / "auto.ckpt"
    shutil.copy(LEGACY / "auto.ckpt", ckpt)  # resume never writes next to the fixture
    overrides = [o for o in WRITTEN_WITH if o != "trainer.max_epochs=1"]
    demo = [f"++data.demo_kwargs.{k}={v}" for k, v in EXPECTED["demo_kwargs"].items()]
    cfg = _compose(
        "train",
        [
            *overrides,
            *demo,
            f"++data.demo_kwargs.root={demo_root}",
            "trainer.max_epochs=2",
            f"ckpt_path={ckpt}",
        ],  # fmt: skip
        tmp_path / "run",
    )
    value = train.train(cfg)
    assert 0.0 <= value <= 1.0
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["steps"] == 6
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 6
    assert last["hyper_parameters"]["cfg"]["sampler"]["_target_"].endswith("AutoSampler")
    before = torch.load(ckpt, weights_only=False)["state_dict"]["classifier.weight"]
    assert not torch.equal(last["state_dict"]["classifier.weight"], before)  # it trained on


@pytest.mark.parametrize(
    "override,new",
    [
        ("sampler.interval=50", "callbacks.index_rebuild.interval=50"),
        ("sampler.background=true", "callbacks.index_rebuild.background=true"),
        ("+sampler.target_recall=0.8", "callbacks.index_rebuild.target_recall=0.8"),
        ("sampler.num_schedule={0:10}", "callbacks.m_schedule.schedule={0:10}"),
        ("optim.warmup_steps=5", "scheduler.warmup_steps=5"),
        ("optim.schedule=step", "scheduler=step"),
        ("optim.total_steps=16", "scheduler.total_steps=16"),
        ("optim.grad_clip=1.0", "grad_clip=1.0"),
    ],
)
def test_moved_override_names_the_new_key(override, new):
    with pytest.raises(MovedKeyError, match=f"use {new}".replace("{", r"\{").replace("}", r"\}")):
        check_overrides(["-m", override, "sampler=annoy"])
    check_overrides(["sampler=hnsw", "sampler.num=1000", "callbacks.index_rebuild.interval=5"])


def test_moved_override_on_the_command_line(tmp_path):
    """train.py says where the key went, before Hydra's generic 'Could not override'."""
    out = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "sampler.interval=50"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert "use callbacks.index_rebuild.interval=50" in out.stderr


def test_moved_key_in_a_composed_config(tmp_path):
    cfg = _compose("train", ["+sampler.interval=5"], tmp_path)
    with pytest.raises(MovedKeyError, match="callbacks.index_rebuild.interval"):
        check_config(cfg)
