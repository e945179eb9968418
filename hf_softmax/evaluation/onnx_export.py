"""ONNX export of a backbone (dynamic batch axis), checked against torch with onnxruntime."""

from __future__ import annotations

import copy
import importlib.util
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data.transforms import normalize
from hf_softmax.evaluation.embed import decode_batch
from hf_softmax.evaluation.errors import EvaluateError

log = logging.getLogger(__name__)


def check_images(images: list[bytes], size: int, channels: int) -> torch.Tensor:
    """(B, channels, size, size) normalised images to compare ONNX with torch on: the given
    encoded images (B = 3 of a verification set), else B = 3 random ones."""
    if not images:
        return torch.randn(3, channels, size, size)
    with ThreadPoolExecutor(max_workers=2) as pool:
        return normalize(decode_batch(images, 0, size, "onnx check", pool, channels))


def export_onnx(
    backbone: nn.Module, input_size: int, path: Path, opset: int, check_images: torch.Tensor
) -> dict[str, Any]:
    """Write the backbone as ONNX (dynamic batch axis "batch") and compare with torch.

    check_images: (B, C, S, S) float32 normalised (C = the backbone's in_channels), B != 2
    (the export batch) to exercise the dynamic axis. Returns {"path", "checked", "max_abs_diff"}.
    """
    if importlib.util.find_spec("onnx") is None:
        raise EvaluateError(
            "export.onnx=true needs the onnx package: pip install -e '.[onnx]' (onnx, onnxruntime)"
        )
    model = copy.deepcopy(backbone).cpu().eval()
    dummy = torch.zeros(2, check_images.shape[1], input_size, input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation, tracer notes
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
            opset_version=opset,
            dynamo=False,  # the TorchScript exporter needs no onnxscript
        )
    result: dict[str, Any] = {"path": str(path), "checked": False, "max_abs_diff": None}
    try:
        import onnxruntime as ort
    except ImportError:
        log.warning("onnxruntime is not installed: skipping the ONNX vs torch check")
        return result
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": check_images.numpy()})[0]
    with torch.no_grad():
        want = model(check_images).numpy()
    diff = float(np.abs(got - want).max())
    scale = float(np.abs(want).max()) or 1.0
    result.update(checked=True, max_abs_diff=diff)
    if got.shape != want.shape or diff > 1e-3 * scale:
        raise EvaluateError(
            f"{path}: ONNX embeddings differ from torch: shape {got.shape} vs {want.shape}, "
            f"max abs diff {diff:.3g} (tolerance {1e-3 * scale:.3g})"
        )
    log.info("ONNX check passed: %s, batch %d, max abs diff %.2e", path, len(got), diff)
    return result
