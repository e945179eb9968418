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

import copy
import csv
import importlib.util
import json
import logging
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from torch import nn

from data.transforms import ImageDecodeError, decode_image, hflip, normalize, resize
from data.verification import VerificationFormatError, VerificationSet, load_bin
from hf_softmax.backbones import build_backbone
from hf_softmax.heads import MarginHead
from hf_softmax.metrics import cosine_scores, model_cost, roc_curve, verification_metrics

log = logging.getLogger("evaluate")

INSIGHTFACE_SETS = ("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw")
# prefixes that DDP/FSDP/torch.compile wrappers put in front of (or inside) parameter names
_WRAPPER_PREFIXES = ("module.", "_forward_module.")


class EvaluateError(RuntimeError):
    """Bad input to evaluate.py; the message names the file/key and what was expected."""


@dataclass
class LoadedCheckpoint:
    path: Path
    backbone: nn.Module  # eval mode, CPU
    model_cfg: dict[str, Any]  # name, embedding_dim, input_size, ...
    train_cfg: dict[str, Any]  # ckpt["hyper_parameters"]["cfg"] ({} if absent)
    state_dict: dict[str, torch.Tensor] = field(repr=False)  # memory-mapped, all keys


# ---------------------------------------------------------------------------------------------
# checkpoint


def _plain(x: Any) -> Any:
    return OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else x


def _strip_wrappers(key: str) -> str:
    """'_forward_module.module.backbone._orig_mod.conv1.weight' -> 'backbone.conv1.weight'."""
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key.replace("_orig_mod.", "")


def _list(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _same_backbone(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(str(a.get(k)) == str(b.get(k)) for k in ("name", "embedding_dim", "input_size"))


def load_checkpoint(path: str | Path, model_cfg: dict[str, Any] | None = None) -> LoadedCheckpoint:
    """Rebuild the backbone of a train.py checkpoint and load its `backbone.*` weights.

    `model_cfg` (the `model=` group, optional) must agree with the checkpoint's own
    hyper_parameters.cfg.model; it is only needed for checkpoints without hyper-parameters.
    Classifier (and any other non-backbone) keys are ignored, so sharded/DDP checkpoints work.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluateError(
            f"checkpoint not found: {path} (expected a .ckpt written by train.py; pass ckpt=PATH)"
        )
    try:
        # mmap: tensors stay on disk until touched; the backbone is copied, the rest never read
        ckpt = torch.load(path, mmap=True, map_location="cpu", weights_only=False)
    except RuntimeError as exc:
        if "mmap" not in str(exc) and "zip" not in str(exc):
            raise EvaluateError(f"{path}: cannot read checkpoint: {exc}") from exc
        log.warning("%s: legacy (non-zip) file, loading without mmap", path)
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise EvaluateError(
                f"{path}: not a torch checkpoint ({type(exc2).__name__}: {exc2})"
            ) from exc2
    except Exception as exc:
        raise EvaluateError(
            f"{path}: not a torch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        found = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise EvaluateError(
            f"{path}: expected a Lightning checkpoint with key 'state_dict', found {found}"
        )
    train_cfg = _plain((ckpt.get("hyper_parameters") or {}).get("cfg")) or {}
    ckpt_model = _plain(train_cfg.get("model")) if isinstance(train_cfg, dict) else None
    if model_cfg and ckpt_model and not _same_backbone(model_cfg, ckpt_model):
        raise EvaluateError(
            f"{path}: checkpoint of another backbone: it was trained with model={ckpt_model}, "
            f"but model={model_cfg} was requested (drop model= to use the checkpoint's own)"
        )
    model_cfg = dict(ckpt_model or model_cfg or {})
    if "name" not in model_cfg:
        raise EvaluateError(
            f"{path}: no hyper_parameters.cfg.model in the checkpoint (not written by train.py?); "
            "pass model=<backbone> to say which backbone it holds"
        )
    kwargs = {k: v for k, v in model_cfg.items() if not str(k).startswith("_")}
    backbone = build_backbone(**kwargs)

    state = ckpt["state_dict"]
    weights: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        plain = _strip_wrappers(key)
        if plain.startswith("backbone."):
            weights[plain[len("backbone.") :]] = value
    if not weights:
        raise EvaluateError(
            f"{path}: state_dict has no 'backbone.*' keys; found: {_list(sorted(state))}"
        )
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(
        f"{k} {tuple(weights[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(weights) & set(expected)
        if weights[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong:
        raise EvaluateError(
            f"{path}: backbone weights do not match {model_cfg.get('name')!r} "
            f"(embedding_dim={model_cfg.get('embedding_dim')}, "
            f"input_size={model_cfg.get('input_size')}); checkpoint of another backbone?\n"
            f"  missing from checkpoint: {_list(missing) or '-'}\n"
            f"  unexpected in checkpoint: {_list(unexpected) or '-'}\n"
            f"  shape (checkpoint vs model): {_list(wrong) or '-'}"
        )
    backbone.load_state_dict(weights, strict=True)
    backbone.eval()
    ignored = len(state) - len(weights)
    log.info(
        "loaded backbone %s from %s (%d tensors; %d non-backbone keys ignored)",
        model_cfg["name"],
        path,
        len(weights),
        ignored,
    )
    return LoadedCheckpoint(path, backbone, model_cfg, train_cfg, state)


# ---------------------------------------------------------------------------------------------
# verification sets


def resolve_bins(cfg: DictConfig, train_cfg: dict[str, Any]) -> list[Path]:
    """`bins` entries -> .bin paths.

    An entry is a path (absolute or relative to the working directory) or a set name (lfw,
    cfp_fp, ...) looked up as <dir>/<name>.bin in data.path (its parent when it is a file) and,
    for demo data, the demo directory. Empty `bins`: data.bins, else the demo's pairs.bin.
    """
    entries = [str(e) for e in (cfg.get("bins") or cfg.data.get("bins") or [])]
    if not entries:
        return [_demo_dir(cfg, train_cfg) / "pairs.bin"]
    data_path = cfg.data.get("path")
    dirs: list[Path] = []
    if data_path:
        p = Path(to_absolute_path(str(data_path)))
        dirs.append(p.parent if p.is_file() else p)
    out = []
    for entry in entries:
        if entry.endswith(".bin") or os.sep in entry:
            as_path = Path(to_absolute_path(entry))
            if not as_path.is_file():
                raise EvaluateError(f"verification set file not found: {as_path}")
            out.append(as_path)
            continue
        looked = [d / f"{entry}.bin" for d in dirs]
        found = next((p for p in looked if p.is_file()), None)
        if found is None and (cfg.data.get("demo") or not data_path):
            looked.append(_demo_dir(cfg, train_cfg) / f"{entry}.bin")
            found = looked[-1] if looked[-1].is_file() else None
        if found is None:
            hint = (
                f"; InsightFace sets ({', '.join(INSIGHTFACE_SETS)}) are looked up in data.path"
                if entry in INSIGHTFACE_SETS
                else f"; known names: {', '.join(INSIGHTFACE_SETS)}, or give a path to a .bin"
            )
            raise EvaluateError(
                f"verification set {entry!r} not found; looked for: "
                f"{', '.join(map(str, looked))}{hint}"
            )
        out.append(found)
    return out


def _demo_dir(cfg: DictConfig, train_cfg: dict[str, Any]) -> Path:
    """The demo directory: the checkpoint's own demo when it was trained on one (its pairs
    come from identities that run never saw), else the one data.demo_kwargs describes."""
    from data.demo import ensure_demo

    train_data = train_cfg.get("data") or {}
    if train_data.get("demo"):
        kwargs = dict(train_data.get("demo_kwargs") or {})
    else:
        kwargs = dict(_plain(cfg.data.get("demo_kwargs")) or {})
    return Path(ensure_demo(**kwargs))


def load_set(path: Path) -> VerificationSet:
    vs = load_bin(path)
    n, p = len(vs.images), len(vs.issame)
    if n % 2:
        raise EvaluateError(f"{path}: odd number of images ({n}); pairs need 2 images each")
    if n != 2 * p:
        raise EvaluateError(f"{path}: {n} images for {p} issame flags; expected 2 x {p} = {2 * p}")
    if p == 0:
        raise EvaluateError(f"{path}: no pairs")
    return vs


# ---------------------------------------------------------------------------------------------
# embeddings


def _decode_batch(
    images: list[bytes],
    start: int,
    size: int,
    source: str,
    pool: ThreadPoolExecutor,
    channels: int = 3,
) -> torch.Tensor:
    """-> (B, channels, size, size) uint8; PIL releases the GIL, so threads decode in parallel."""

    def one(i: int) -> torch.Tensor:
        where = f"{source} image {start + i}"
        img = decode_image(images[i], where, size=(size, size), channels=channels)
        return resize(img, (size, size))

    return torch.stack(list(pool.map(one, range(len(images)))))


@torch.no_grad()
def embed_images(
    backbone: nn.Module,
    images: list[bytes],
    input_size: int,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    flip: bool = True,
    source: str = "",
    channels: int = 3,
) -> np.ndarray:
    """Encoded images -> (N, D) float32 L2-normalised embeddings (flip TTA: f(x) + f(flip(x))).

    Images are decoded as RGB (channels 3) or grayscale (1), the backbone's in_channels.
    """
    out = []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = _decode_batch(chunk, start, input_size, source, pool, channels)
            x = normalize(batch).to(device)
            if flip:
                e = backbone(torch.cat([x, hflip(x)]))
                e = e[: len(chunk)] + e[len(chunk) :]
            else:
                e = backbone(x)
            out.append(F.normalize(e.float(), dim=1).cpu())
    return torch.cat(out).numpy()


# ---------------------------------------------------------------------------------------------
# outputs


def plot_roc(scores: np.ndarray, issame: np.ndarray, metrics: dict, name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, tpr, _ = roc_curve(scores, issame)
    n_neg = max(int((~issame).sum()), 1)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    keep = fpr > 0  # log axis: FAR 0 is off the chart
    ax.plot(fpr[keep], tpr[keep], lw=1.5, label=f"AUC {metrics['auc']:.4f}")
    for key, value in metrics.items():
        if key.startswith("tar@far="):
            far = float(key.split("=", 1)[1])
            ax.scatter(
                [max(far, 1 / n_neg)],
                [value],
                s=18,
                zorder=3,
                label=f"TAR@FAR={far:g}: {value:.4f}",
            )
    ax.set_xscale("log")
    ax.set_xlim(min(1e-4, 1 / n_neg), 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(f"{name}: acc {100 * metrics['acc']:.2f} ± {100 * metrics['acc_std']:.2f} %")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_table(rows: list[dict[str, Any]]) -> str:
    """rows of verification results -> aligned text table."""
    columns = ["set", "pairs", "acc %", "± std", "threshold"]
    tar_keys = [k for k in rows[0] if k.startswith("tar@far=")] if rows else []
    columns += [k.replace("tar@far=", "TAR@") for k in tar_keys] + ["AUC", "sec"]
    lines = []
    for r in rows:
        lines.append(
            [r["set"], str(r["pairs"]), f"{100 * r['acc']:.2f}", f"{100 * r['acc_std']:.2f}"]
            + [f"{r['threshold']:.4f}"]
            + [f"{r[k]:.4f}" for k in tar_keys]
            + [f"{r['auc']:.4f}", f"{r['seconds']:.1f}"]
        )
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(columns)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt.format(*columns), sep, *(fmt.format(*line) for line in lines)])


def closed_set_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Closed-set results of the summary (holdout, then top1_rec files) as table rows."""
    results = {"holdout": summary["top1"]} if "top1" in summary else {}
    results.update(summary.get("closed_set", {}))
    keys = ("top1", f"top{TOPK}", "images", "classes", "seconds")
    return [{"set": name, **{k: r[k] for k in keys if k in r}} for name, r in results.items()]


def flat_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Table rows -> {"<set>/<column>": value} (``pairs/acc``, ``test/top1``, ``test/top5``)."""
    return {f"{r['set']}/{k}": v for r in rows for k, v in r.items() if k != "set"}


def write_tables(rows: list[dict[str, Any]], summary: dict[str, Any], out_dir: Path) -> None:
    """metrics.csv: one row per set (verification columns, then closed-set ones; cells of the
    other kind empty); metrics.json: the summary."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    with open(out_dir / "metrics.json", "w") as f:
        json.dump(summary, f, indent=2)


# ---------------------------------------------------------------------------------------------
# ONNX


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


# ---------------------------------------------------------------------------------------------
# closed-set top-1 / top-5

TOPK = 5  # closed-set top-k reported next to top-1


def classifier_rows(loaded: LoadedCheckpoint) -> tuple[torch.Tensor, MarginHead]:
    """The checkpoint's classifier rows W (N, D), memory-mapped, and its head (plain logits)."""
    from hf_softmax.heads import build_head

    state = loaded.state_dict
    wkey = next((k for k in state if _strip_wrappers(k) == "classifier.weight"), None)
    if wkey is None:
        found = [k for k in state if "classifier" in k]
        raise EvaluateError(
            f"{loaded.path}: closed-set top-1 needs 'classifier.weight' (N, D); "
            f"classifier keys found: {_list(found) or '-'}"
        )
    head_cfg = dict(loaded.train_cfg.get("head") or {"name": "linear"})
    head = build_head(**{k: v for k, v in head_cfg.items() if not str(k).startswith("_")})
    return state[wkey], head


@torch.no_grad()
def closed_set_counts(
    backbone: nn.Module,
    loader: Any,
    weight: torch.Tensor,
    head: MarginHead,
    flip: bool,
    chunk_size: int,
    device: torch.device,
) -> np.ndarray:
    """Per-class counts of the argmax over all N rows: (N, 3) int64 = images, top-1 correct,
    top-k correct (k = TOPK), for a loader of ``(images (B,C,H,W), labels (B,) in 0..N-1)``.

    Rows are scored ``chunk_size`` at a time with the head's plain logits (``rows.topk_rows``);
    with ``flip`` the features are f(x) + f(flip x).
    """
    from hf_softmax.row_store import topk_rows

    counts = np.zeros((weight.shape[0], 3), np.int64)
    for images, labels in loader:
        x = images.to(device)
        if flip:
            f = backbone(torch.cat([x, hflip(x)]))
            f = f[: len(x)] + f[len(x) :]
        else:
            f = backbone(x)
        _, ids = topk_rows(f.float(), weight, head, TOPK, chunk_size)  # (B, k) best first
        hits = (ids.cpu() == labels[:, None]).numpy()  # (B, k)
        y = labels.numpy()
        np.add.at(counts[:, 0], y, 1)
        np.add.at(counts[:, 1], y, hits[:, 0])
        np.add.at(counts[:, 2], y, hits.any(axis=1))
    return counts


def closed_set_result(counts: np.ndarray, name: str, out_dir: Path) -> dict[str, Any]:
    """counts (N, 3) -> {"top1", "top5", "images", "classes", "per_class"}; writes
    ``per_class_<name>.csv`` (class, images, top1_correct, top5_correct; classes with images)."""
    path = out_dir / f"per_class_{name}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "images", "top1_correct", f"top{TOPK}_correct"])
        for c in np.flatnonzero(counts[:, 0]):
            writer.writerow([int(c), *map(int, counts[c])])
    total = int(counts[:, 0].sum())
    return {
        "top1": int(counts[:, 1].sum()) / max(total, 1),
        f"top{TOPK}": int(counts[:, 2].sum()) / max(total, 1),
        "images": total,
        "classes": int(counts.shape[0]),
        "per_class": str(path),
    }


@torch.no_grad()
def closed_set_top1(
    loaded: LoadedCheckpoint, cfg: DictConfig, device: torch.device, flip: bool, out_dir: Path
) -> dict[str, Any]:
    """Top-1 / top-5 over all N classifier rows on held-out images of the training classes.

    The held-out split is training's (same data.val_fraction and seed); writes
    ``per_class_holdout.csv``.
    """
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    train_data = loaded.train_cfg.get("data") or {}
    if not data_cfg.get("val_fraction"):
        # the split that training held out: same fraction and seed give the same images
        data_cfg["val_fraction"] = train_data.get("val_fraction") or 0.0
        data_cfg["seed"] = train_data.get("seed", data_cfg.get("seed", 0))
    if not data_cfg["val_fraction"]:
        raise EvaluateError(
            "closed-set top-1 needs held-out images: the checkpoint was trained with "
            "data.val_fraction=0; pass data.val_fraction=<f> (those images were seen in training)"
        )
    weight, head = classifier_rows(loaded)
    data_cfg["image_size"] = int(loaded.model_cfg["input_size"])
    data_cfg["channels"] = int(loaded.model_cfg.get("in_channels", 3))
    data_cfg["bins"] = []
    dm = hydra.utils.instantiate(data_cfg)
    dm.setup("validate")
    if dm.holdout_dataset is None:
        raise EvaluateError(f"{dm.rec_path}: no held-out images (data.val_fraction too small?)")
    loader = dm.val_dataloader()[dm.val_names.index("holdout")]
    chunk = int(cfg.get("top1_chunk_size", 65536))
    counts = closed_set_counts(loaded.backbone, loader, weight, head, flip, chunk, device)
    return closed_set_result(counts, "holdout", out_dir)


def resolve_top1_recs(value: Any) -> list[Path]:
    """``top1_rec``: a .rec path, a directory holding ``test.rec``, or a list of them."""
    value = _plain(value)  # a ListConfig from the command line
    entries = value if isinstance(value, list | tuple) else [value]
    out = []
    for entry in entries:
        p = Path(to_absolute_path(str(entry)))
        rec = p / "test.rec" if p.is_dir() else p
        if not rec.is_file():
            raise EvaluateError(
                f"top1_rec={entry}: no RecordIO file at {rec} (expected a .rec with its .idx, "
                "or a directory with test.rec)"
            )
        out.append(rec)
    return out


@torch.no_grad()
def closed_set_rec(
    loaded: LoadedCheckpoint,
    rec: Path,
    name: str,
    cfg: DictConfig,
    device: torch.device,
    flip: bool,
    out_dir: Path,
) -> dict[str, Any]:
    """Top-1 / top-5 over all N classifier rows on every image of a labelled .rec (InsightFace
    or plain layout) whose labels are training class ids; writes ``per_class_<name>.csv``."""
    from torch.utils.data import DataLoader

    from data.datamodule import RecordImageDataset, collate_images
    from data.layout import read_layout
    from data.recordio import RecordReader

    weight, head = classifier_rows(loaded)
    n = int(weight.shape[0])
    reader = RecordReader(rec)
    layout = read_layout(reader)
    bad = np.flatnonzero((layout.labels < 0) | (layout.labels >= n))
    if len(bad):
        i = int(bad[0])
        raise EvaluateError(
            f"{rec}: record key {int(layout.image_keys[i])} has label {int(layout.labels[i])}, "
            f"expected 0..{n - 1} (top1_rec must share the training label space: the checkpoint "
            f"has N = {n} classifier rows); {len(bad)} of {len(layout)} images out of range"
        )
    size = int(loaded.model_cfg["input_size"])
    dataset = RecordImageDataset(
        reader,
        layout.image_keys,
        layout.labels,
        (size, size),
        channels=int(loaded.model_cfg.get("in_channels", 3)),
    )
    loader = DataLoader(
        dataset,
        batch_size=int(cfg.batch_size),
        num_workers=int(cfg.data.get("num_workers", 0) or 0),
        collate_fn=collate_images,
    )
    chunk = int(cfg.get("top1_chunk_size", 65536))
    counts = closed_set_counts(loaded.backbone, loader, weight, head, flip, chunk, device)
    return {"path": str(rec), **closed_set_result(counts, name, out_dir)}


# ---------------------------------------------------------------------------------------------
# loggers


def build_loggers(cfg: DictConfig) -> list:
    """Instantiate the `logger` group: one `_target_` node or a dict of them (none -> [])."""
    node = cfg.get("logger")
    if not node:
        return []
    items = [node] if "_target_" in node else [v for v in node.values() if v and "_target_" in v]
    return [hydra.utils.instantiate(item) for item in items]


def log_to_loggers(
    loggers: list, rows: list[dict[str, Any]], summary: dict[str, Any], out_dir: Path
) -> None:
    from pytorch_lightning.loggers import WandbLogger

    flat = dict(summary["metrics"])
    flat.update({f"model/{k}": v for k, v in summary["model"].items() if isinstance(v, int)})
    for logger in loggers:
        logger.log_metrics(flat)
        if isinstance(logger, WandbLogger) and rows:
            columns = list(rows[0])
            logger.log_table(
                key="verification", columns=columns, data=[list(r.values()) for r in rows]
            )
            for r in rows:
                png = out_dir / f"roc_{r['set']}.png"
                if png.is_file():
                    logger.log_image(key=f"roc/{r['set']}", images=[str(png)])
        logger.save()
        logger.finalize("success")
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish()


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
    model_override = _plain(cfg.get("model"))
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
        vs = load_set(path)
        if vs.name in summary["sets"]:  # two files with the same stem
            vs.name = f"{vs.name}_{len(rows)}"
        t0 = time.perf_counter()
        emb = embed_images(
            backbone, vs.images, size, int(cfg.batch_size), device, flip, str(path), channels
        )  # (2P, D), pairs are rows (2i, 2i+1)
        metrics = verification_metrics(
            emb[0::2], emb[1::2], vs.issame, int(cfg.nfolds), tuple(map(float, cfg.fars))
        )
        seconds = time.perf_counter() - t0
        row = {"set": vs.name, "pairs": len(vs.issame), **metrics, "seconds": seconds}
        rows.append(row)
        summary["sets"][vs.name] = {"path": str(path), **metrics, "seconds": seconds}
        if cfg.save_features:
            (out_dir / "features").mkdir(exist_ok=True)
            np.save(out_dir / "features" / f"{vs.name}.npy", emb.astype(np.float32))
            np.save(out_dir / "features" / f"{vs.name}_issame.npy", vs.issame)
        if cfg.plots:
            scores = cosine_scores(emb[0::2], emb[1::2])
            plot_roc(scores, vs.issame, metrics, vs.name, out_dir / f"roc_{vs.name}.png")
        first_images = first_images or vs.images[:3]
        log.info("%s: %d pairs in %.1f s", vs.name, len(vs.issame), seconds)

    top1 = cfg.top1
    if top1 == "auto":  # data=rec with a held-out split (this run's or the checkpoint's)
        split = cfg.data.get("val_fraction") or (loaded.train_cfg.get("data") or {}).get(
            "val_fraction"
        )
        top1 = not cfg.data.get("demo", False) and bool(split)
    if top1:
        t0 = time.perf_counter()
        summary["top1"] = closed_set_top1(loaded, cfg, device, flip, out_dir)
        summary["top1"]["seconds"] = time.perf_counter() - t0
    for rec in top1_recs:
        name = rec.stem
        taken = {*summary["sets"], *summary.get("closed_set", {}), "holdout"}
        if name in taken:  # e.g. two test.rec in different directories
            name = f"{name}_{len(taken)}"
        t0 = time.perf_counter()
        result = closed_set_rec(loaded, rec, name, cfg, device, flip, out_dir)
        result["seconds"] = time.perf_counter() - t0
        summary.setdefault("closed_set", {})[name] = result

    closed = closed_set_rows(summary)
    summary["metrics"] = flat_metrics(rows + closed)
    if rows:
        print(format_table(rows))
    for r in closed:
        print(
            f"closed-set ({r['set']}): top-1 {100 * r['top1']:.2f} %, top-{TOPK} "
            f"{100 * r[f'top{TOPK}']:.2f} % ({r['images']} images, {r['classes']} classes)"
        )
    if cfg.export.onnx:
        onnx_path = (
            Path(to_absolute_path(str(cfg.export.path)))
            if cfg.export.path
            else (out_dir / f"{loaded.model_cfg['name']}.onnx")
        )
        if first_images:
            with ThreadPoolExecutor(max_workers=2) as pool:
                batch = _decode_batch(first_images, 0, size, "onnx check", pool, channels)
                check = normalize(batch)
        else:
            check = torch.randn(3, channels, size, size)
        summary["onnx"] = export_onnx(backbone, size, onnx_path, int(cfg.export.opset), check)
        print(
            f"ONNX: {onnx_path}"
            + (
                f" (checked against torch: max abs diff {summary['onnx']['max_abs_diff']:.2e})"
                if summary["onnx"]["checked"]
                else " (onnxruntime missing: not checked)"
            )
        )
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
    main()
