"""Data throughput: images/s from .rec to decoded, flipped, normalised batches.

Compares, on the same 112x112 JPEG face images (rendered demo identities):

- ``rec``: our ``RecordImageDataset`` over train.rec/.idx (``data.recordio`` + PIL decode),
- ``folder``: the same bytes unpacked by ``data.rec2img`` into one file per image,
- ``mxnet``: ``mx.recordio.MXIndexedRecordIO`` + ``mx.image.imdecode`` (only when an interpreter
  with mxnet is available: ``import mxnet`` here, or ``--mxnet-python`` / ``$MXNET_PYTHON``
  pointing at a separate venv with numpy<1.24; otherwise reported as skipped),

each read sequentially (key order) and shuffled, through a DataLoader with 0, 1 and 2 workers
(mxnet: one process, its usual single-threaded loop). Every number is the median over repeats
of a full pass, measured after one warm-up pass (warm page cache, workers already started).

    python -m bench.data_throughput --quick            # ~1 min on 2 cores
    python -m bench.data_throughput --out docs/bench/data_throughput.md

Writes a Markdown table (``--out``), a PNG plot and a JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bench.common import REPO, machine_info, markdown_table, pyplot, setup_logging
from bench.data_mxnet import mxnet_python_path, time_mxnet
from data.datasets import RecordImageDataset, collate_images
from data.demo_faces import encode_jpeg, render_faces, sample_identities
from data.recordio import IRHeader, RecordReader, RecordWriter, pack
from data.transforms import decode_image, hflip

log = logging.getLogger("bench.data_throughput")

DEFAULT_OUT = REPO / "docs" / "bench" / "data_throughput.md"
IMAGE_SIZE = 112
BATCH = 128


class FolderDataset(Dataset):
    """Images from a ``rec2img`` folder (``train.lst``): same decode/flip path as the .rec one."""

    def __init__(self, root: Path, image_size: int = IMAGE_SIZE):
        self.root = root
        lines = (root / "train.lst").read_text().split("\n")
        rows = [line.rsplit(" ", 1) for line in lines if line]
        self.paths = [r[0] for r in rows]
        self.labels = [int(r[1]) for r in rows]
        self.size = (image_size, image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        data = (self.root / self.paths[i]).read_bytes()
        img = decode_image(data, self.paths[i], size=self.size)
        if torch.rand(()) < 0.5:
            img = hflip(img)
        return img, self.labels[i]


def make_dataset(root: Path, num_images: int, seed: int = 0) -> tuple[Path, Path]:
    """Write ``num_images`` 112x112 JPEG faces as train.rec/.idx (plain keys) + a rec2img folder."""
    from data.layout import write_property
    from data.rec2img import rec_to_images

    rng = np.random.default_rng(seed)
    per_class = 8
    params, _ = sample_identities(rng, -(-num_images // per_class), 8, 0.07)
    labels = np.repeat(np.arange(len(params)), per_class)[:num_images]
    rec_dir = root / "rec"
    rec_dir.mkdir(parents=True)
    with RecordWriter(rec_dir / "train.rec", rec_dir / "train.idx") as w:
        for start in range(0, num_images, 256):
            lab = labels[start : start + 256]
            for j, arr in enumerate(render_faces(params[lab], rng, IMAGE_SIZE)):
                key = start + j
                w.write_idx(key, pack(IRHeader(0, float(lab[j]), key, 0), encode_jpeg(arr, 95)))
    write_property(rec_dir / "property", len(params), (IMAGE_SIZE, IMAGE_SIZE))
    folder = root / "folder"
    rec_to_images(rec_dir / "train.rec", folder)
    return rec_dir, folder


def _loader(dataset: Dataset, shuffle: bool, workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=BATCH,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate_images,
        persistent_workers=workers > 0,
    )


def time_loader(loader: DataLoader, repeats: int) -> tuple[float, int]:
    """Median seconds of a full pass after one warm-up pass, and images per pass."""

    def one_pass() -> int:
        return sum(len(y) for _, y in loader)

    n = one_pass()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), n


def run(quick: bool = False, mxnet_python: str | None = None, workers=(0, 1, 2)) -> dict[str, Any]:
    """Measure every (source, order, workers) combination; returns rows + machine info."""
    num_images = 1024 if quick else 5120
    repeats = 3 if quick else 5
    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="hf_softmax_bench_data_"))
    try:
        t0 = time.perf_counter()
        rec_dir, folder = make_dataset(tmp, num_images)
        rec_bytes = (rec_dir / "train.rec").stat().st_size
        log.info("wrote %d images (%.1f MB) in %.1f s", num_images, rec_bytes / 1e6,
                 time.perf_counter() - t0)  # fmt: skip
        reader = RecordReader(rec_dir / "train.rec")
        keys = np.asarray(reader.keys, dtype=np.int64)
        labels = np.zeros(len(keys), np.int64)
        rec_ds = RecordImageDataset(reader, keys, labels, (IMAGE_SIZE, IMAGE_SIZE), flip=True)
        folder_ds = FolderDataset(folder)
        for shuffle in (False, True):
            order = "shuffled" if shuffle else "sequential"
            for w in workers:
                for source, ds in (("rec", rec_ds), ("folder", folder_ds)):
                    loader = _loader(ds, shuffle, w)
                    sec, n = time_loader(loader, repeats)
                    del loader
                    rows.append(dict(source=source, order=order, workers=w, images=n,
                                     seconds=sec, images_per_s=n / sec))  # fmt: skip
                    log.info("%-7s %-10s workers=%d: %8.0f images/s", source, order, w, n / sec)
        py, why = mxnet_python_path(mxnet_python)
        mxnet_note = why
        if py is not None:
            for shuffle in (False, True):
                res = time_mxnet(py, rec_dir, keys.tolist(), repeats, shuffle, BATCH)
                sec = float(np.median(res["times"]))
                rows.append(dict(source="mxnet", order="shuffled" if shuffle else "sequential",
                                 workers=0, images=res["n"], seconds=sec,
                                 images_per_s=res["n"] / sec))  # fmt: skip
            mxnet_note = f"mxnet {res['version']} via {py}"
        else:
            log.info("%s", why)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def rate(source: str, order: str, w: int) -> float | None:
        for r in rows:
            if (r["source"], r["order"], r["workers"]) == (source, order, w):
                return r["images_per_s"]
        return None

    for r in rows:
        if r["source"] == "rec":
            folder_rate = rate("folder", r["order"], r["workers"])
            mx_rate = rate("mxnet", r["order"], 0)
            r["vs_folder"] = r["images_per_s"] / folder_rate if folder_rate else None
            r["vs_mxnet"] = r["images_per_s"] / mx_rate if mx_rate else None
    return dict(
        quick=quick,
        num_images=num_images,
        image_size=IMAGE_SIZE,
        batch_size=BATCH,
        repeats=repeats,
        mxnet=mxnet_note,
        machine=machine_info(),
        rows=rows,
    )


def to_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    cols = [
        ("source", "source", None),
        ("order", "order", None),
        ("workers", "workers", None),
        ("images_per_s", "images/s (median)", lambda v: f"{v:,.0f}"),
        ("vs_folder", "rec ÷ folder", lambda v: f"{v:.2f}×"),
        ("vs_mxnet", "rec ÷ mxnet (0 workers)", lambda v: f"{v:.2f}×"),
    ]
    rows = sorted(result["rows"], key=lambda r: (r["order"], r["workers"], r["source"]))
    head = (
        f"### Data throughput: .rec → decoded, flipped, normalised batches\n\n"
        f"{result['num_images']} JPEG images {result['image_size']}×{result['image_size']}, "
        f"batch {result['batch_size']}, median of {result['repeats']} passes after a warm-up "
        f"pass (warm page cache){' — quick mode' if result['quick'] else ''}. "
        f"Machine: {m['cpu']}, {m['cores']} cores, load average at the end "
        f"{', '.join(f'{x:.1f}' for x in (m['loadavg'] or ()))}. "
        f"mxnet: {result['mxnet']}.\n\n"
    )
    return head + markdown_table(rows, cols) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for ax, order in zip(axes, ("sequential", "shuffled"), strict=True):
        for source, marker in (("rec", "o"), ("folder", "s"), ("mxnet", "^")):
            pts = [(r["workers"], r["images_per_s"]) for r in result["rows"]
                   if r["source"] == source and r["order"] == order]  # fmt: skip
            if pts:
                xs, ys = zip(*sorted(pts), strict=True)
                ax.plot(xs, ys, marker=marker, label=source)
        ax.set_title(order)
        ax.set_xlabel("DataLoader workers")
        ax.set_xticks(sorted({r["workers"] for r in result["rows"]}))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("images / s")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1024 images, 3 repeats")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown output path")
    p.add_argument("--mxnet-python", default=None, help="interpreter of a venv with mxnet")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    setup_logging()
    result = run(args.quick, args.mxnet_python, tuple(args.workers))
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_markdown(result))
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    plot(result, out.with_suffix(".png"))
    log.info("wrote %s (+ .png, .json)", out)
    return result


if __name__ == "__main__":
    main()
