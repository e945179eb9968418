"""Unpack a RecordIO dataset into image files, bytes untouched.

    python -m data.rec2img --rec DATA_DIR_OR_TRAIN_REC --out DIR [--val-fraction 0.1 --seed 0]

Writes every image as ``DIR/<label>/<key>.<ext>`` with its original encoded bytes (no
re-encoding), ``DIR/train.lst`` with one ``<relative path> <label>`` line per image and, with
``--val-fraction``, ``DIR/val.lst`` holding a random per-class share of the images (each class
keeps at least one image in train.lst; held-out images are left out of train.lst).
``python -m data.img2rec --src DIR/train.lst --out NEW`` packs them back.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.layout import read_layout
from data.recordio import RecordReader, unpack

log = logging.getLogger(__name__)


def image_extension(data: bytes) -> str:
    """File extension from the encoded image's magic bytes (``bin`` if unknown)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    return "bin"


def find_rec(path: str | Path) -> Path:
    """``path`` itself if it is a file, else ``path/train.rec`` or the only ``*.rec`` in it."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / "train.rec").is_file():
        return path / "train.rec"
    recs = sorted(path.glob("*.rec")) if path.is_dir() else []
    if len(recs) != 1:
        raise FileNotFoundError(f"{path}: expected a .rec file or a folder holding train.rec")
    return recs[0]


def holdout_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(n,) bool: a random ~``fraction`` of each class, never a class's last image."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), bool)
    if fraction <= 0:
        return mask
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    for members in np.split(order, bounds):
        k = min(len(members) - 1, int(fraction * len(members) + rng.random()))
        if k > 0:
            mask[rng.choice(members, k, replace=False)] = True
    return mask


def rec_to_images(
    rec: str | Path, out: str | Path, val_fraction: float = 0.0, seed: int = 0
) -> tuple[int, int]:
    """Unpack ``rec`` into ``out``; returns (train images, held-out images)."""
    rec_path = find_rec(rec)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with RecordReader(rec_path) as reader:
        layout = read_layout(reader)
        held = holdout_mask(layout.labels, val_fraction, seed)
        train_lines, val_lines = [], []
        made: set[int] = set()
        items = zip(layout.image_keys.tolist(), layout.labels.tolist(), held, strict=True)
        for key, label, is_val in tqdm(items, total=len(layout), desc="rec2img", unit="img"):
            _, img = unpack(reader.read_idx(key))
            if label not in made:
                (out / str(label)).mkdir(exist_ok=True)
                made.add(label)
            rel = f"{label}/{key}.{image_extension(img)}"
            (out / rel).write_bytes(img)
            (val_lines if is_val else train_lines).append(f"{rel} {label}\n")
    (out / "train.lst").write_text("".join(train_lines))
    if val_fraction > 0:
        (out / "val.lst").write_text("".join(val_lines))
    log.info(
        "%s -> %s: %d images in train.lst, %d held out, %d classes",
        rec_path,
        out,
        len(train_lines),
        len(val_lines),
        layout.num_classes,
    )
    return len(train_lines), len(val_lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data.rec2img",
        description="Write every image of a RecordIO dataset to OUT/<label>/<key>.<ext> "
        "(original bytes) plus OUT/train.lst ('<relative path> <label>' lines).",
    )
    parser.add_argument("--rec", required=True, help="a .rec file or a folder with train.rec")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="share of each class's images listed in OUT/val.lst instead of train.lst",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out choice")
    args = parser.parse_args(argv)
    if not 0.0 <= args.val_fraction < 1.0:
        parser.error("--val-fraction must be in [0, 1)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rec_to_images(args.rec, args.out, args.val_fraction, args.seed)


if __name__ == "__main__":
    main()
