"""Shared test settings: offline wandb, few threads, paths to the MXNet-written fixtures."""

import csv
import os
from pathlib import Path

import pytest

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
