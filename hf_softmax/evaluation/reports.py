"""What evaluate.py reports: the text table, ROC plots, metrics.csv / metrics.json, loggers.

Rows are dicts with a ``set`` key: verification rows (``pairs``, ``acc``, ``acc_std``,
``threshold``, ``tar@far=...``, ``auc``, ``seconds``) and closed-set rows (``top1``, ``top5``,
``images``, ``classes``, ``seconds``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from hf_softmax.evaluation.closed_set import TOPK
from hf_softmax.metrics import roc_curve


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


def closed_set_line(row: dict[str, Any]) -> str:
    """One closed-set row as the line evaluate.py prints."""
    return (
        f"closed-set ({row['set']}): top-1 {100 * row['top1']:.2f} %, top-{TOPK} "
        f"{100 * row[f'top{TOPK}']:.2f} % ({row['images']} images, {row['classes']} classes)"
    )


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


def onnx_line(result: dict[str, Any]) -> str:
    """The line evaluate.py prints after an ONNX export (``onnx_export.export_onnx``'s result)."""
    if not result["checked"]:
        return f"ONNX: {result['path']} (onnxruntime missing: not checked)"
    diff = result["max_abs_diff"]
    return f"ONNX: {result['path']} (checked against torch: max abs diff {diff:.2e})"
