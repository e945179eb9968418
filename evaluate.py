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
import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from data.transforms import ImageDecodeError
from data.verification import VerificationFormatError, find_bin, is_bin_name, load_bin
from hf_softmax.evaluation.checkpoint import (
    classifier_rows,
    load_checkpoint,
    plain_config,
)
from hf_softmax.evaluation.closed_set import (
    closed_set_counts,
    closed_set_result,
    holdout_loader,
    rec_loader,
    resolve_top1_recs,
)
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
from hf_softmax.metrics import model_cost

log = logging.getLogger("evaluate")

INSIGHTFACE_SETS = ("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw")
# ---------------------------------------------------------------------------------------------
# verification sets


def resolve_bins(cfg: DictConfig, train_cfg: dict[str, Any]) -> list[Path]:
    """`bins` entries -> .bin paths, by the DataModule's rule (``data.verification.find_bin``).

    An entry is a path or a set name (lfw, cfp_fp, ...) looked up as <dir>/<name>.bin in
    data.path (its parent when it is a file) and, for demo data, the demo directory. Empty
    `bins`: data.bins, else the demo's pairs.bin.
    """
    entries = [str(e) for e in (cfg.get("bins") or cfg.data.get("bins") or [])]
    if not entries:
        return [_demo_dir(cfg, train_cfg) / "pairs.bin"]
    data_path = cfg.data.get("path")
    dirs: list[Path] = []
    if data_path:
        p = Path(to_absolute_path(str(data_path)))
        dirs.append(p.parent if p.is_file() else p)
    if (cfg.data.get("demo") or not data_path) and any(map(is_bin_name, entries)):
        dirs.append(_demo_dir(cfg, train_cfg))
    out = []
    for entry in entries:
        try:
            out.append(find_bin(entry, dirs, cwd=Path(to_absolute_path("."))))
        except FileNotFoundError as exc:
            hint = (
                f"; InsightFace sets ({', '.join(INSIGHTFACE_SETS)}) are looked up in data.path"
                if entry in INSIGHTFACE_SETS
                else f"; known names: {', '.join(INSIGHTFACE_SETS)}, or give a path to a .bin"
            )
            raise EvaluateError(f"{exc}{hint}") from None
    return out


def _demo_dir(cfg: DictConfig, train_cfg: dict[str, Any]) -> Path:
    """The demo directory: the checkpoint's own demo when it was trained on one (its pairs
    come from identities that run never saw), else the one data.demo_kwargs describes."""
    from data.demo import ensure_demo

    train_data = train_cfg.get("data") or {}
    if train_data.get("demo"):
        kwargs = dict(train_data.get("demo_kwargs") or {})
    else:
        kwargs = dict(plain_config(cfg.data.get("demo_kwargs")) or {})
    return Path(ensure_demo(**kwargs))


# ---------------------------------------------------------------------------------------------
# main


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_flip(value: Any, train_cfg: dict[str, Any]) -> bool:
    """``flip``: true/false, or ``auto`` = the checkpoint's data.flip (true when absent:
    checkpoints from before data.flip trained with random flips)."""
    if str(value).lower() == "auto":
        return bool((train_cfg.get("data") or {}).get("flip", True))
    if isinstance(value, bool):
        return value
    raise EvaluateError(f"flip={value!r}: expected true, false or auto")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the whole evaluation; returns the summary written to metrics.json."""
    out_dir = Path(to_absolute_path(str(cfg.out_dir)))
    out_dir.mkdir(parents=True, exist_ok=True)
    device = _device(str(cfg.device))
    if OmegaConf.is_missing(cfg.data, "path"):
        raise EvaluateError("data=rec needs data.path=<dataset directory with train.rec and .bin>")
    model_override = plain_config(cfg.get("model"))
    loaded = load_checkpoint(to_absolute_path(str(cfg.ckpt)), model_override)
    size = int(loaded.model_cfg["input_size"])
    channels = int(loaded.model_cfg.get("in_channels", 3))
    flip = resolve_flip(cfg.flip, loaded.train_cfg)
    top1_recs = resolve_top1_recs(cfg.top1_rec) if cfg.get("top1_rec") else []
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

    train_data = loaded.train_cfg.get("data") or {}
    top1 = cfg.top1
    if top1 == "auto":  # data=rec with a held-out split (this run's or the checkpoint's)
        split = cfg.data.get("val_fraction") or train_data.get("val_fraction")
        top1 = not cfg.data.get("demo", False) and bool(split)
    if top1 or top1_recs:
        weight, head = classifier_rows(loaded)
        chunk = int(cfg.get("top1_chunk_size", 65536))

        def score(loader: Any, name: str) -> dict[str, Any]:
            t0 = time.perf_counter()
            counts = closed_set_counts(backbone, loader, weight, head, flip, chunk, device)
            return {**closed_set_result(counts, name, out_dir), "seconds": time.perf_counter() - t0}

        if top1:  # training's held-out split: same data.val_fraction and seed
            summary["top1"] = score(holdout_loader(cfg.data, train_data, size, channels), "holdout")
        workers = int(cfg.data.get("num_workers", 0) or 0)
        for rec in top1_recs:
            name = rec.stem
            taken = {*summary["sets"], *summary.get("closed_set", {}), "holdout"}
            if name in taken:  # e.g. two test.rec in different directories
                name = f"{name}_{len(taken)}"
            loader = rec_loader(rec, len(weight), size, channels, int(cfg.batch_size), workers)
            summary.setdefault("closed_set", {})[name] = {"path": str(rec), **score(loader, name)}

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
