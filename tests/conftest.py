"""Shared test settings: offline wandb, few threads, paths to the MXNet-written fixtures."""

import csv
import os
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
MXNET_REC = FIXTURES / "mxnet_rec"

# A demo small enough for end-to-end runs in tests (data.demo_kwargs).
TINY_DEMO = {
    "num_classes": 48,
    "family_size": 4,
    "images_per_class": 5,
    "num_unseen": 16,
    "images_per_unseen": 4,
    "num_pairs": 40,
}


def step_losses(run_dir: Path) -> dict[int, float]:
    """train/loss_step per global step from the CSV logger's metrics.csv files of a run."""
    out = {}
    for path in run_dir.glob("csv/*/metrics.csv"):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("train/loss_step"):
                    out[int(row["step"])] = float(row["train/loss_step"])
    return out


@pytest.fixture
def mxnet_rec_dir() -> Path:
    """The RecordIO files written by the real MXNet 1.9.1 (read-only ground truth)."""
    return MXNET_REC


def module_cfg(sampler: str = "annoy", head: str = "cosface", **optim) -> DictConfig:
    """A train config for ``hf_softmax.build.build_module`` from the real YAMLs: tiny backbone
    (D = 32), constant LR; ``optim``: lr/momentum/weight_decay, ``schedule`` (the scheduler
    YAML) and the scheduler's keys."""
    conf = REPO / "conf"
    cfg = OmegaConf.create(
        {
            "seed": 0,
            "model": OmegaConf.load(conf / "model/tiny.yaml"),
            "head": OmegaConf.load(conf / f"head/{head}.yaml"),
            "sampler": OmegaConf.load(conf / f"sampler/{sampler}.yaml"),
            "optim": OmegaConf.load(conf / "optim/sgd.yaml"),
            "scheduler": OmegaConf.load(
                conf / f"scheduler/{optim.pop('schedule', 'constant')}.yaml"
            ),
            "classifier": {"offload": False},
            "validation": {"flip": True, "nfolds": 10},
        }
    )
    cfg.model.embedding_dim = 32
    cfg.scheduler.warmup_steps = 0
    optim = {"lr": 0.05, **optim}  # lr, momentum, weight_decay; the rest are schedule keys
    for key, value in optim.items():
        node = cfg.optim if key in ("lr", "momentum", "weight_decay") else cfg.scheduler
        node[key] = value
    return cfg


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """A fresh demo cache ($HF_SOFTMAX_CACHE) for one test module; restored afterwards."""
    old = os.environ.get("HF_SOFTMAX_CACHE")
    os.environ["HF_SOFTMAX_CACHE"] = str(tmp_path_factory.mktemp("demo_cache"))
    yield os.environ["HF_SOFTMAX_CACHE"]
    if old is None:
        os.environ.pop("HF_SOFTMAX_CACHE", None)
    else:
        os.environ["HF_SOFTMAX_CACHE"] = old
