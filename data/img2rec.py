"""Pack image files into an InsightFace-layout RecordIO dataset, bytes untouched.

    python -m data.img2rec --src FOLDER_OR_LIST --out DIR

``--src`` is either

- a list file, one image per line: ``<path> <label>`` (as ``rec2img`` writes ``train.lst``)
  or MXNet's ``index<TAB>label<TAB>path``; paths are relative to the list's folder; or
- a folder of class folders ``<class>/<image>``: integer folder names are the labels,
  otherwise the sorted names get labels 0..C-1 (written to ``DIR/classes.txt``).

Writes ``DIR/train.rec``, ``DIR/train.idx`` and ``DIR/property`` (``num_classes,H,W``; H, W of
the first image): record 0 is the header (label ``(imgnum, totnum)``), keys 1..imgnum-1 the
images sorted by label (file order kept within a label), then one identity record per class
with label ``(first key, end key)`` — the layout MXNet/InsightFace tools write.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.layout import write_insightface, write_property
from data.recordio import RecordIOError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif"}


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def read_list(path: str | Path) -> list[tuple[Path, int]]:
    """``(image path, label)`` from ``<path> <label>`` or ``index<TAB>label<TAB>path`` lines."""
    path = Path(path)
    items = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) >= 3 and fields[0].strip().isdigit():  # MXNet .lst
            rel, label = fields[-1], fields[1]
        else:
            parts = line.rsplit(None, 1)
            if len(parts) != 2:
                raise RecordIOError(
                    f"{path}: line {lineno}: expected '<path> <label>', got {line!r}"
                )
            rel, label = parts
        try:
            value = float(label)
        except ValueError:
            value = -1.0
        if value < 0 or not value.is_integer():
            raise RecordIOError(
                f"{path}: line {lineno}: label {label!r}, expected a non-negative integer"
            )
        items.append((path.parent / rel.strip(), int(value)))
    return items


def scan_folder(root: str | Path) -> tuple[list[tuple[Path, int]], list[str] | None]:
    """``(image path, label)`` from class folders; also the class names when not integers."""
    root = Path(root)
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    names = [c.name for c in classes]
    numeric = all(n.isdigit() for n in names)
    if numeric:
        labels = [int(n) for n in names]
    else:
        labels = list(range(len(classes)))
    items = []
    for folder, label in zip(classes, labels, strict=True):
        files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
        items.extend((p, label) for p in sorted(files, key=_natural_key))
    return items, None if numeric else names


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file, read from its header only."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception as e:  # any PIL failure: the file is not an image we can measure
        raise RecordIOError(f"{path}: cannot read the image size ({e}), expected an image") from e


def images_to_rec(src: str | Path, out: str | Path) -> int:
    """Pack ``src`` (list file or class folders) into ``out``; returns the number of images."""
    src, out = Path(src), Path(out)
    names = None
    if src.is_file():
        items = read_list(src)
    elif src.is_dir():
        items, names = scan_folder(src)
    else:
        raise FileNotFoundError(f"{src}: expected a list file or a folder of class folders")
    if not items:
        raise RecordIOError(f"{src}: empty dataset, expected at least one image")
    labels = np.array([label for _, label in items], dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    num_classes = int(labels.max()) + 1
    out.mkdir(parents=True, exist_ok=True)
    size = image_size(items[order[0]][0])
    paths = (items[i][0] for i in tqdm(order.tolist(), desc="img2rec", unit="img"))
    write_insightface(
        out / "train.rec",
        out / "train.idx",
        labels[order],
        (p.read_bytes() for p in paths),
        num_classes,
    )
    write_property(out / "property", num_classes, size)
    if names is not None:
        (out / "classes.txt").write_text("".join(f"{n}\n" for n in names))
    log.info("%s -> %s: %d images, %d classes", src, out / "train.rec", len(items), num_classes)
    return len(items)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data.img2rec",
        description="Pack images (a '<path> <label>' list or <class>/<image> folders) into an "
        "InsightFace-layout OUT/train.rec, OUT/train.idx and OUT/property, bytes untouched.",
    )
    parser.add_argument("--src", required=True, help="list file or folder of class folders")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    images_to_rec(args.src, args.out)


if __name__ == "__main__":
    main()
