"""Evaluate a trained backbone on face-verification sets, the way the field reports it.

    python evaluate.py ckpt=outputs/.../last.ckpt                      # the demo's pairs.bin
    python evaluate.py ckpt=... data=rec data.path=/data/ms1m bins=[lfw,cfp_fp,agedb_30]
    python evaluate.py ckpt=... bins=[/path/to/my.bin] export.onnx=true logger=none
    python evaluate.py ckpt=... top1_rec=/data/glyphs/test.rec      # or a dir with test.rec

Only the backbone is read from the Lightning checkpoint (memory-mapped, so the N x D classifier
of a 10^6-class run is never loaded), except for closed-set top-1/top-5 (`data=rec` held-out
images, `top1_rec` labelled .rec files), which streams the classifier rows in chunks. For each
verification set: flip-TTA embeddings (embedding(img) + embedding(flip(img)), L2-normalised;
`flip=auto` follows the checkpoint's data.flip), 10-fold accuracy (LFW protocol), TAR@FAR, AUC
(hf_softmax.metrics). Images are decoded with the backbone's model.in_channels (1: grayscale).

Outputs in the run directory: metrics.csv (one row per set), metrics.json, features/<set>.npy
(+ <set>_issame.npy), roc_<set>.png, per_class_<name>.csv (closed set), optional <model>.onnx.
metrics.json keys: ckpt, model, flip, nfolds, sets.<set> (verification metrics), top1
(holdout: top1, top5, images, classes, per_class, seconds), closed_set.<name> (top1_rec
files, name = the .rec's stem: path, top1, top5, images, classes, per_class, seconds), onnx,
and metrics: the flat values the loggers get (`<set>/acc`, `<set>/auc`, ..., `holdout/top1`,
`holdout/top5`, `<name>/top1`, `<name>/top5`, `<name>/images`, ...).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from data.transforms import ImageDecodeError
from data.verification import VerificationFormatError, load_bin
from hf_softmax.evaluation.checkpoint import (
    load_checkpoint,
    plain_config,
)
from hf_softmax.evaluation.closed_set import closed_set_summary, resolve_top1_recs
from hf_softmax.evaluation.errors import EvaluateError
from hf_softmax.evaluation.onnx_export import check_images, export_onnx
from hf_softmax.evaluation.pairs import save_pair_outputs, verify_set
from hf_softmax.evaluation.reports import (
    build_loggers,
    closed_set_line,
    closed_set_rows,
    flat_metrics,
    format_table,
    log_to_loggers,
    onnx_line,
    write_tables,
)
from hf_softmax.evaluation.sources import resolve_bins, resolve_device, resolve_flip
from hf_softmax.metrics import model_cost

log = logging.getLogger("evaluate")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the whole evaluation; returns the summary written to metrics.json."""
    out_dir = Path(to_absolute_path(str(cfg.out_dir)))
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(str(cfg.device))
    if OmegaConf.is_missing(cfg.data, "path"):
        raise EvaluateError("data=rec needs data.path=<dataset directory with train.rec and .bin>")
    model_override = plain_config(cfg.get("model"))
    loaded = load_checkpoint(to_absolute_path(str(cfg.ckpt)), model_override)
    size = int(loaded.model_cfg["input_size"])
    channels = int(loaded.model_cfg.get("in_channels", 3))
    flip = resolve_flip(cfg.flip, loaded.train_cfg)
    if cfg.get("top1_rec"):
        resolve_top1_recs(cfg.top1_rec)  # a missing file fails before any work
    cost = model_cost(loaded.backbone, size)
    print(f"backbone {loaded.model_cfg['name']} @ {size}x{size}x{channels}: {cost}")
    summary: dict[str, Any] = {
        "ckpt": str(loaded.path),
        "model": {**loaded.model_cfg, "params": cost.params, "macs": cost.macs},
        "flip": flip,
        "nfolds": int(cfg.nfolds),
        "sets": {},
    }
    backbone = loaded.backbone.to(device)
    rows = []
    first_images: list[bytes] = []
    for path in resolve_bins(cfg, loaded.train_cfg):
        vs = load_bin(path)  # checks the pair list (VerificationFormatError)
        if vs.name in summary["sets"]:  # two files with the same stem
            vs.name = f"{vs.name}_{len(rows)}"
        t0 = time.perf_counter()
        metrics, emb = verify_set(
            backbone, vs, size, int(cfg.batch_size), device, flip, channels, int(cfg.nfolds),
            tuple(map(float, cfg.fars)),
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        rows.append({"set": vs.name, "pairs": len(vs.issame), **metrics, "seconds": seconds})
        summary["sets"][vs.name] = {"path": str(path), **metrics, "seconds": seconds}
        save_pair_outputs(out_dir, vs, emb, metrics, cfg.save_features, cfg.plots)
        first_images = first_images or vs.images[:3]
        log.info("%s: %d pairs in %.1f s", vs.name, len(vs.issame), seconds)

    summary.update(
        closed_set_summary(cfg, loaded, backbone, flip, device, out_dir, summary["sets"])
    )
    closed = closed_set_rows(summary)
    summary["metrics"] = flat_metrics(rows + closed)
    if rows:
        print(format_table(rows))
    for r in closed:
        print(closed_set_line(r))
    if cfg.export.onnx:
        onnx_path = (
            Path(to_absolute_path(str(cfg.export.path)))
            if cfg.export.path
            else (out_dir / f"{loaded.model_cfg['name']}.onnx")
        )
        check = check_images(first_images, size, channels)
        summary["onnx"] = export_onnx(backbone, size, onnx_path, int(cfg.export.opset), check)
        print(onnx_line(summary["onnx"]))
    write_tables(rows + closed, summary, out_dir)
    loggers = build_loggers(cfg)
    if loggers:
        log_to_loggers(loggers, rows, summary, out_dir)
    print(f"outputs: {out_dir}")
    return summary


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    os.environ.setdefault("WANDB_MODE", "offline")
    try:
        summary = evaluate(cfg)
    except (EvaluateError, VerificationFormatError, ImageDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    accs = [s["acc"] for s in summary["sets"].values()]
    return float(np.mean(accs)) if accs else float("nan")


if __name__ == "__main__":
    from hf_softmax.config_keys import MovedKeyError, check_overrides

    try:
        check_overrides(sys.argv[1:])
    except MovedKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    main()
