"""Train a face-recognition backbone with HF-Softmax (sampled softmax over M active classes).

    python train.py                                   # demo data, annoy sampler, CPU, ~minutes
    python train.py sampler=hnsw sampler.num=1000
    python train.py data=rec data.path=/data/faces_emore trainer=gpu experiment=ms1m_iresnet50
    python train.py ckpt_path=last                    # resume the newest run (or a .ckpt path)
    python train.py -m sampler=annoy sampler.ntrees=10,50,100   # sweep -> multirun/.../summary.md

Config: conf/train.yaml and its groups. Returns (for sweeps) the final verification accuracy
on the first .bin set (or ``optimized_metric``). At the end it prints a summary (verification
accuracy per .bin set, closed-set top-1/top-5 on held-out images, the last epoch's train
accuracy, wall time) and writes it to ``<run dir>/final_metrics.json``; a multirun's
``summary.md`` tabulates those numbers for every job (``hf_softmax/sweep.py``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("WANDB_MODE", "offline")  # never reach the network unless asked to

import hydra  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from hf_softmax.config_keys import MovedKeyError, check_overrides  # noqa: E402
from hf_softmax.sweep import FINAL_METRICS_FILE  # noqa: E402

log = logging.getLogger("train")


def resolve_ckpt_path(value: str | None, output_dir: Path, runs_dir: Path | None) -> str | None:
    """``ckpt_path`` -> a checkpoint file or None.

    ``last``: ``<output_dir>/checkpoints/last.ckpt`` if present, else the newest
    ``**/checkpoints/last.ckpt`` under ``runs_dir`` (None, with a warning, if there is none).
    Anything else must be an existing file.
    """
    if value in (None, "", "null"):
        return None
    if str(value) == "last":
        own = output_dir / "checkpoints" / "last.ckpt"
        if own.is_file():
            return str(own)
        found = sorted(runs_dir.glob("**/checkpoints/last.ckpt")) if runs_dir else []
        found = [p for p in found if p.is_file()]
        if not found:
            log.warning("ckpt_path=last: no checkpoints/last.ckpt under %s; training from scratch",
                        runs_dir)  # fmt: skip
            return None
        newest = max(found, key=lambda p: p.stat().st_mtime)
        log.info("ckpt_path=last -> %s", newest)
        return str(newest)
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={value}: no such checkpoint file")
    return str(path)


def _instantiate_all(node: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict node (callbacks, loggers)."""
    out = []
    if not node:
        return out
    for _, conf in node.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            out.append(hydra.utils.instantiate(conf))
    return out


def final_metrics(
    metrics: dict[str, float], val_names: list[str], steps: int, wall_s: float
) -> dict[str, float]:
    """The end-of-run numbers (``final_metrics.json``; sweep summaries tabulate them).

    ``val/<set>/acc`` per .bin set and ``val/holdout/top1`` (+ ``top5``) from the last
    validation; ``train/acc``: the last epoch's mean top-1 within the active set (plain
    logits), ``train/acc_full``: the last top-1 over all N rows; ``steps``; ``wall_s``: train.py's
    own time (data generation included, interpreter start-up not). Absent metrics are left out.
    """
    out: dict[str, float] = {}
    for name in val_names:
        keys = ("top1", "top5") if name == "holdout" else ("acc",)
        for key in keys:
            if f"val/{name}/{key}" in metrics:
                out[f"val/{name}/{key}"] = metrics[f"val/{name}/{key}"]
    for key in ("train/acc", "train/acc_full"):
        # logged on_step and on_epoch: Lightning keeps <key>_epoch (last epoch's mean)
        for source in (f"{key}_epoch", key, f"{key}_step"):
            if source in metrics:
                out[key] = metrics[source]
                break
    out["steps"] = int(steps)
    out["wall_s"] = round(float(wall_s), 1)
    return out


def format_final(final: dict[str, Any], path: Path) -> str:
    """The summary train.py prints at the end: one labelled line per number of ``final``."""
    rows = [
        (f"verification acc ({key.split('/')[1]}, 10-fold)", f"{v:.4f}")
        for key, v in final.items()
        if key.startswith("val/") and key.endswith("/acc")
    ]
    for key, label in (
        ("val/holdout/top1", "closed-set top-1 (held-out images, all classes)"),
        ("val/holdout/top5", "closed-set top-5 (held-out images, all classes)"),
        ("train/acc", "train acc (last epoch, within the active set)"),
        ("train/acc_full", "train acc_full (last, over all classes)"),
    ):
        if key in final:
            rows.append((label, f"{final[key]:.4f}"))
    rows.append(("wall time", f"{final['wall_s']:.0f} s ({final['steps']} steps)"))
    width = max(len(label) for label, _ in rows)
    return "\n".join([f"final metrics -> {path}"] + [f"  {a:<{width}}  {b}" for a, b in rows])


def _check_trainer_cfg(cfg: DictConfig) -> None:
    from hf_softmax.samplers import sampler_class

    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision in ("16", "16-mixed") and not sampler_class(cfg.sampler).dense:
        raise ValueError(
            f"trainer.precision={precision} scales the loss, and the scaled gradients would reach "
            "the sparse classifier update; use bf16-mixed or 32-true"
        )


def train(cfg: DictConfig) -> float:
    """Build data, module, callbacks, loggers and trainer from ``cfg``; fit; return the metric.

    Construction: ``instantiate(cfg.data)`` -> N; ``build_module(cfg, N)`` instantiates the
    backbone, head, sampler partial, optimizer and scheduler partials from their groups and
    the classifier (``hf_softmax.build``); callbacks, loggers and the trainer from theirs.
    """
    from hf_softmax.build import build_module
    from hf_softmax.config_check import check_config

    t_start = time.perf_counter()
    check_config(cfg)  # moved keys, names, knobs, interval, schedule: before any work
    _check_trainer_cfg(cfg)
    pl.seed_everything(int(cfg.seed), workers=True)
    if cfg.get("torch_threads"):
        import torch

        torch.set_num_threads(int(cfg.torch_threads))

    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()  # demo: generates it once (cached); learns num_classes
    num_classes = int(datamodule.num_classes)
    check_config(cfg, num_classes)
    log.info("data ready (%d classes) after %.1fs", num_classes, time.perf_counter() - t_start)

    module = build_module(cfg, num_classes)
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if cfg.trainer.get("enable_progress_bar") is False:  # Lightning refuses a bar then
        from pytorch_lightning.callbacks.progress import ProgressBar

        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = _instantiate_all(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers if loggers else False
    )
    output_dir = Path(cfg.paths.output_dir)
    runs_dir = cfg.paths.get("runs_dir")
    ckpt_path = resolve_ckpt_path(
        cfg.get("ckpt_path"), output_dir, Path(runs_dir) if runs_dir else None
    )

    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    ckpt_cb = trainer.checkpoint_callback
    last = getattr(ckpt_cb, "last_model_path", "")
    if last and module.last_saved_step != trainer.global_step:
        # Step checkpoints (every_n_train_steps) can end before the last step: the final
        # state goes to last.ckpt too (all ranks call it: the sharded state dict gathers).
        trainer.save_checkpoint(last)
    saved = last or getattr(ckpt_cb, "best_model_path", "")
    if not saved:  # e.g. fast_dev_run disables checkpoint callbacks
        saved = str(output_dir / "checkpoints" / "final.ckpt")
        trainer.save_checkpoint(saved)

    metric_name = cfg.get("optimized_metric")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    val_names = list(getattr(datamodule, "val_names", []) or [])
    if not metric_name:
        names = [n for n in val_names if n != "holdout"]
        metric_name = f"val/{names[0]}/acc" if names else "val/holdout/top1"
    if metric_name not in metrics and trainer.limit_val_batches:
        results = trainer.validate(module, datamodule=datamodule, verbose=False)
        for r in results:
            metrics.update({k: float(v) for k, v in r.items()})
    value = metrics.get(metric_name, float("nan"))

    elapsed = time.perf_counter() - t_start
    final = final_metrics(metrics, val_names, trainer.global_step, elapsed)
    final["optimized_metric"] = metric_name
    summary = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k.startswith("val/"))
    if trainer.is_global_zero:  # under DDP every rank runs this; print once
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / FINAL_METRICS_FILE).write_text(json.dumps(final, indent=2) + "\n")
        print(f"checkpoint: {saved}")
        print(f"validation: {summary or '(none)'}")
        print(format_final(final, output_dir / FINAL_METRICS_FILE))
        print(f"final {metric_name} = {value:.4f}  ({trainer.global_step} steps, {elapsed:.0f}s)")
    return value


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    return train(cfg)


if __name__ == "__main__":
    try:  # Hydra rejects a moved key without saying where it went: say it first
        check_overrides(sys.argv[1:])
    except MovedKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    main()
