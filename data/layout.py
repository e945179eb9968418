"""Which records of a .rec are images, their class labels, and the number of classes.

Two layouts:

- **insightface** (``face2rec``/InsightFace datasets): record 0 has flag > 0, an empty payload
  and label ``(imgnum, totnum)``; keys ``1..imgnum-1`` are images; keys ``imgnum..totnum-1`` are
  one record per identity whose label is the key range ``(first, end)`` of its images.
- **plain** (``im2rec``): every key of the .idx is an image.

``num_classes`` comes from the ``property`` file beside the .rec (``N,H,W``), else from the
labels (max + 1). Labels are read with a header-only path (``RecordReader.read_labels``: one
vectorised gather of the 24-byte header per record), so a 5M-image dataset opens in seconds;
nothing is cached on disk. ``write_insightface`` writes the InsightFace layout (every writer
here uses it); ``split_holdout`` picks the images held out of training for closed-set top-1.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.recordio import IRHeader, RecordIOError, RecordReader, RecordWriter, pack, unpack

log = logging.getLogger(__name__)


@dataclass
class RecLayout:
    """Image keys and labels of one RecordIO dataset."""

    kind: str  # "insightface" | "plain"
    image_keys: np.ndarray  # (n,) int64
    labels: np.ndarray  # (n,) int64, label of each image key (first float label)
    num_classes: int
    identity_ranges: dict[int, tuple[int, int]] = field(default_factory=dict)  # key -> (first, end)
    image_size: tuple[int, int] | None = None  # (H, W) from property

    def __len__(self) -> int:
        return len(self.image_keys)


def read_property(path: str | Path) -> tuple[int, tuple[int, int] | None]:
    """``(num_classes, (H, W) or None)`` from an InsightFace ``property`` file (``N,H,W``)."""
    path = Path(path)
    text = path.read_text().strip()
    fields = [f.strip() for f in text.split(",")]
    try:
        values = [int(f) for f in fields]
    except ValueError:
        values = []
    if len(values) not in (1, 3) or values[0] <= 0:
        raise RecordIOError(f"{path}: expected 'num_classes,height,width', got {text!r}")
    return values[0], (values[1], values[2]) if len(values) == 3 else None


def write_property(path: str | Path, num_classes: int, image_size: tuple[int, int]) -> None:
    """Write ``N,H,W`` (no newline, as InsightFace's tools do)."""
    Path(path).write_text(f"{num_classes},{image_size[0]},{image_size[1]}")


def write_insightface(
    rec_path: str | os.PathLike,
    idx_path: str | os.PathLike,
    labels,
    payloads: Iterable[bytes],
    num_classes: int,
) -> tuple[int, int]:
    """Write an InsightFace-layout .rec/.idx; returns ``(imgnum, totnum)``.

    ``labels``: ``(n,)`` class ids, non-decreasing (images grouped by class); ``payloads``
    yields the n encoded images in the same order (consumed lazily). Key 0 is the header
    ``(imgnum, totnum)``, keys ``1..n`` the images, then one identity record per class with
    the key range ``(first, end)`` of its images (empty for a class without images).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and (np.diff(labels).min(initial=0) < 0 or labels[0] < 0):
        raise RecordIOError(f"{rec_path}: labels must be non-negative and sorted by class")
    if len(labels) and labels[-1] >= num_classes:
        raise RecordIOError(
            f"{rec_path}: label {int(labels[-1])} outside 0..{num_classes - 1} (num_classes)"
        )
    imgnum = len(labels) + 1
    totnum = imgnum + num_classes
    with RecordWriter(rec_path, idx_path) as writer:
        writer.write_idx(0, pack(IRHeader(2, [imgnum, totnum], 0, 0), b""))
        try:
            for key, (label, data) in enumerate(zip(labels.tolist(), payloads, strict=True), 1):
                writer.write_idx(key, pack(IRHeader(0, float(label), key, 0), data))
        except ValueError as e:  # zip(strict=True): payloads and labels differ in length
            raise RecordIOError(
                f"{rec_path}: {e}; expected one image per label ({len(labels)})"
            ) from None
        # identity records: class c owns keys first..end-1 (empty range if it has no images)
        starts = np.searchsorted(labels, np.arange(num_classes + 1)) + 1
        for c in range(num_classes):
            key = imgnum + c
            rng = [int(starts[c]), int(starts[c + 1])]
            writer.write_idx(key, pack(IRHeader(2, rng, key, 0), b""))
    return imgnum, totnum


def _insightface_header(reader: RecordReader) -> tuple[int, int] | None:
    """``(imgnum, totnum)`` if record 0 is an InsightFace header record, else None."""
    if 0 not in reader:
        return None
    header, payload = unpack(reader.read_idx(0))
    if header.flag < 2 or payload:
        return None
    imgnum, totnum = float(header.label[0]), float(header.label[1])
    if not (imgnum.is_integer() and totnum.is_integer() and 1 <= imgnum <= totnum):
        raise RecordIOError(
            f"{reader.rec_path}: key 0: header record label ({imgnum}, {totnum}), "
            "expected integers 1 <= imgnum <= totnum"
        )
    if imgnum - 1 > len(reader) or totnum - imgnum > len(reader):
        raise RecordIOError(
            f"{reader.rec_path}: key 0: header record label ({imgnum:.0f}, {totnum:.0f}), "
            f"expected imgnum-1 images and totnum-imgnum identities within {len(reader)} records"
        )
    return int(imgnum), int(totnum)


def _as_int_labels(reader: RecordReader, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    bad = ~np.isfinite(values) | (values != np.floor(values)) | (values < 0) | (values >= 2**31)
    if bad.any():
        i = int(bad.argmax())
        raise RecordIOError(
            f"{reader.rec_path}: key {int(keys[i])}: label {values[i]!r}, "
            "expected a non-negative integer class id"
        )
    return values.astype(np.int64)


def read_layout(reader: RecordReader, property_path: Path | str | None = None) -> RecLayout:
    """Image keys, labels and class count of the dataset behind ``reader``.

    ``property_path`` defaults to ``property`` beside the .rec (used when it exists). Raises
    RecordIOError for an empty dataset, missing image keys, or a label outside
    ``0..num_classes-1``.
    """
    if len(reader) == 0:
        raise RecordIOError(f"{reader.rec_path}: empty dataset, expected at least one record")
    if property_path is None:
        candidate = reader.rec_path.parent / "property"
        property_path = candidate if candidate.is_file() else None
    prop_classes, image_size = read_property(property_path) if property_path else (None, None)

    head = _insightface_header(reader)
    identity_ranges: dict[int, tuple[int, int]] = {}
    if head is not None:
        imgnum, totnum = head
        kind = "insightface"
        image_keys = np.arange(1, imgnum, dtype=np.int64)
        try:
            positions = reader.positions(image_keys)
        except KeyError as e:
            raise RecordIOError(f"{e.args[0]}, expected image keys 1..{imgnum - 1}") from None
        id_keys = np.arange(imgnum, totnum, dtype=np.int64)
        id_keys = id_keys[[k in reader for k in id_keys.tolist()]] if len(id_keys) else id_keys
        if len(id_keys):
            flags, ranges = reader.read_labels(reader.positions(id_keys), width=2)
            for k, f, (a, b) in zip(id_keys.tolist(), flags, ranges, strict=True):
                if f < 2 or not (1 <= a <= b <= imgnum):
                    raise RecordIOError(
                        f"{reader.rec_path}: key {k}: identity record label ({a}, {b}), "
                        f"expected a key range 1 <= first <= end <= {imgnum}"
                    )
                identity_ranges[k] = (int(a), int(b))
    else:
        kind = "plain"
        image_keys = reader.key_array.copy()
        positions = np.arange(len(reader), dtype=np.int64)
    if len(image_keys) == 0:
        raise RecordIOError(f"{reader.rec_path}: empty dataset, no image records ({kind} layout)")

    _, raw = reader.read_labels(positions, width=1)
    labels = _as_int_labels(reader, image_keys, raw[:, 0])
    num_classes = prop_classes if prop_classes is not None else int(labels.max()) + 1
    bad = labels >= num_classes
    if bad.any():
        i = int(bad.argmax())
        source = f"property {property_path}" if prop_classes is not None else "the labels"
        raise RecordIOError(
            f"{reader.rec_path}: key {int(image_keys[i])}: label {int(labels[i])} outside "
            f"0..{num_classes - 1} (num_classes {num_classes} from {source})"
        )
    log.info(
        "%s: %s layout, %d images, %d classes", reader.rec_path, kind, len(image_keys), num_classes
    )
    return RecLayout(kind, image_keys, labels, num_classes, identity_ranges, image_size)


def split_holdout(
    labels: np.ndarray, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split image positions into (train, holdout) keeping >= 1 training image per class.

    Args:
        labels: ``(n,)`` int64 class of each image.
        fraction: wanted share of held-out images, in [0, 1).
    Returns:
        ``(train_positions, holdout_positions)``, each sorted int64.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    n = len(labels)
    if fraction == 0.0 or n == 0:
        return np.arange(n, dtype=np.int64), np.empty(0, np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    held = order[: int(round(fraction * n))]
    # a class whose images were all held out gets its first held-out image back
    _, held_counts = np.unique(labels[held], return_counts=True)
    classes, total = np.unique(labels, return_counts=True)
    all_held = np.zeros(labels.max() + 1 if n else 0, bool)
    held_classes = np.unique(labels[held])
    all_held[held_classes] = held_counts == total[np.searchsorted(classes, held_classes)]
    if all_held.any():
        back = np.zeros(len(held), bool)
        seen: set[int] = set()
        for j, c in enumerate(labels[held].tolist()):
            if all_held[c] and c not in seen:
                seen.add(c)
                back[j] = True
        held = held[~back]
    mask = np.zeros(n, bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)
