"""Every option of every config group composes (hydra.compose) and instantiates cheaply."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from hf_softmax.backbones import BACKBONES
from hf_softmax.config_check import check_config
from hf_softmax.heads import MarginHead
from hf_softmax.samplers import Sampler, sampler_names

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
GROUPS = [
    "data",
    "model",
    "head",
    "sampler",
    "optim",
    "scheduler",
    "trainer",
    "logger",
    "callbacks",
    "experiment",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_train(overrides: list[str], tmp_path: Path) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.runs_dir = str(tmp_path)
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"conf/{group}/ is empty"
    assert set(options("sampler")) == set(sampler_names())  # one YAML per sampler file
    assert {"cosine", "step", "constant"} == set(options("scheduler"))
    assert {"cpu", "gpu", "ddp"} <= set(options("trainer"))
    assert {"default", "wandb", "csv", "none"} <= set(options("logger"))
    assert "ms1m_iresnet50" in options("experiment")


def test_defaults(tmp_path):
    cfg = compose_train([], tmp_path)
    assert cfg.data.demo is True and cfg.model.name == "tiny"
    assert cfg.sampler._target_ == "hf_softmax.samplers.auto.AutoSampler"
    assert cfg.trainer.accelerator == "cpu"
    assert set(cfg.logger) == {"wandb", "csv"}
    assert cfg.hydra.callbacks.sweep_summary._target_ == "hf_softmax.sweep.SweepSummary"
    assert cfg.trainer.plugins[0]._target_ == "hf_softmax.checkpoint_io.AtomicCheckpointIO"
    check_config(cfg, num_classes=2000)


@pytest.mark.parametrize("data", options("data"))
def test_flip_and_channels_follow_data_and_model(data, tmp_path, mxnet_rec_dir):
    """validation.flip follows data.flip; data.channels follows model.in_channels."""
    extra = [f"data.path={mxnet_rec_dir}"] if data == "rec" else []
    cfg = compose_train([f"data={data}", *extra], tmp_path)
    assert cfg.data.flip is True and cfg.validation.flip is True
    assert cfg.model.in_channels == 3 and cfg.data.channels == 3
    assert cfg.validation.acc_full_every == 50
    gray = ["data.flip=false", "model.in_channels=1"]
    cfg = compose_train([f"data={data}", *extra, *gray], tmp_path)
    assert cfg.validation.flip is False and cfg.data.channels == 1
    dm = instantiate(cfg.data)
    assert dm.flip is False and dm.channels == 1
    assert instantiate(cfg.model).in_channels == 1


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS if g != "experiment" for o in options(g)]
)
def test_group_option_composes_and_instantiates(group, option, tmp_path, mxnet_rec_dir):
    overrides = [f"{group}={option}"]
    if group == "data" and option != "demo":
        overrides.append(f"data.path={mxnet_rec_dir}")
    cfg = compose_train(overrides, tmp_path)
    node = cfg[group]
    if group == "data":
        dm = instantiate(node)
        assert isinstance(dm, pl.LightningDataModule)
    elif group == "model":
        assert node.name in BACKBONES
        if node.name in ("tiny", "iresnet18", "mobilefacenet"):  # the big ones take seconds
            net = instantiate(node)
            assert net.embedding_dim == node.embedding_dim
    elif group == "head":
        head = instantiate(node)
        assert isinstance(head, MarginHead) and head.metric in ("ip", "cosine")
    elif group == "sampler":
        s = instantiate(node)(num_classes=2000, metric="cosine", seed=0)
        assert isinstance(s, Sampler)
        assert s.name == option and s.num == (2000 if s.dense else node.num)
        check_config(cfg, num_classes=2000)
    elif group == "optim":
        opt = instantiate(node)([torch.zeros(2, requires_grad=True)])
        assert opt.param_groups[0]["lr"] == node.lr
    elif group == "scheduler":
        opt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=1.0)
        sched = instantiate(node)(opt, estimated_steps=100, steps_per_epoch=10)
        assert sched.get_last_lr()[0] == pytest.approx(node.warmup_start_factor)
        check_config(cfg)
    elif group == "trainer":
        assert node._target_ == "pytorch_lightning.Trainer"
        if node.accelerator == "cpu":
            trainer = instantiate(node, logger=False, enable_checkpointing=False)
            assert isinstance(trainer, pl.Trainer)
        else:  # no GPU here: check what the GPU configs promise instead
            assert node.precision in ("bf16-mixed", "32-true")
            assert instantiate(node.plugins[0]).__class__.__name__ == "AtomicCheckpointIO"
    elif group == "logger":
        loggers = [instantiate(c) for c in (node or {}).values()]
        assert {type(x).__name__ for x in loggers} <= {"WandbLogger", "CSVLogger"}
        if option == "none":
            assert not loggers
    elif group == "callbacks":
        cbs = [instantiate(c) for c in node.values()]
        names = {type(c).__name__ for c in cbs}
        assert {"ModelCheckpoint", "IndexRebuild"} <= names
        rebuild = next(c for c in cbs if type(c).__name__ == "IndexRebuild")
        assert rebuild.interval == cfg.callbacks.index_rebuild.interval == 20  # the demo's


@pytest.mark.parametrize("option", options("experiment"))
def test_experiment_composes(option, tmp_path, mxnet_rec_dir):
    cfg = compose_train([f"experiment={option}", f"data.path={mxnet_rec_dir}"], tmp_path)
    if option == "ms1m_iresnet50":
        assert cfg.model.name == "iresnet50" and cfg.model.embedding_dim == 512
        assert cfg.model.input_size == 112 and cfg.data.image_size == 112
        assert cfg.data.batch_size == 128 and cfg.optim.lr == 0.1
        assert cfg.scheduler.schedule == "step" and cfg.scheduler.milestones == [10, 16, 18]
        assert cfg.callbacks.index_rebuild.interval == 1000
        assert cfg.trainer.max_epochs == 20
        assert cfg.head._target_.endswith("ArcFaceHead") and cfg.sampler._target_.endswith(
            "HNSWSampler"
        )
        assert cfg.data._target_ == "data.datamodule.RecordDataModule" and not cfg.data.demo
    check_config(cfg)
    instantiate(cfg.data)


def test_experiment_null_and_cli_overrides(tmp_path):
    cfg = compose_train(["~experiment", "sampler=hnsw", "sampler.num=1000"], tmp_path)
    assert cfg.sampler._target_.endswith("HNSWSampler") and cfg.sampler.num == 1000
    demo = compose_train(["sampler=hnsw"], tmp_path)
    assert demo.sampler.num == 200  # the demo experiment's M applies to every sampler


def test_bad_names_fail_with_valid_list(tmp_path):
    cfg = compose_train(["sampler._target_=hf_softmax.samplers.lsh.LSHSampler"], tmp_path)
    with pytest.raises(ValueError, match="valid names"):
        check_config(cfg)
    cfg = compose_train(["callbacks.index_rebuild.interval=0"], tmp_path)
    with pytest.raises(ValueError, match="callbacks.index_rebuild.interval must be >= 1"):
        check_config(cfg)
    cfg = compose_train(["+sampler.trees=3"], tmp_path)
    with pytest.raises(ValueError, match=r"unknown config keys \['trees'\]"):
        check_config(cfg)
