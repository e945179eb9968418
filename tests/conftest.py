"""Shared test settings: offline wandb, few threads, paths to the MXNet-written fixtures."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
MXNET_REC = FIXTURES / "mxnet_rec"


@pytest.fixture
def mxnet_rec_dir() -> Path:
    """The RecordIO files written by the real MXNet 1.9.1 (read-only ground truth)."""
    return MXNET_REC
