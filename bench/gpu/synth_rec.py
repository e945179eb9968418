"""A synthetic InsightFace-layout RecordIO dataset with many classes, written fast.

``train.rec`` / ``train.idx`` / ``property`` as ``data/demo.py`` writes them, with
``data.layout.write_insightface`` (record 0 = (imgnum, totnum), images grouped by identity, one
range record per identity), but the images are drawn from a small pool of rendered demo faces
(``data.demo.render_faces``), so 10^5 classes take seconds. It measures speed and memory, not
accuracy: identities share pixels. Each image is JPEG-encoded at ``image_size`` (the training
resolution, so the loader only decodes).
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data.demo import render_faces, sample_identities
from data.layout import write_insightface, write_property

log = logging.getLogger(__name__)


def face_pool(size: int, count: int, seed: int = 0) -> list[bytes]:
    """``count`` distinct demo faces of ``size`` x ``size``, JPEG-encoded."""
    rng = np.random.default_rng(seed)
    params, _ = sample_identities(rng, count, family_size=4, spread=0.07)
    out = []
    for arr in render_faces(params, rng, size):
        buf = io.BytesIO()
        Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def write_synthetic_rec(
    out_dir: Path | str,
    num_classes: int,
    images_per_class: int = 1,
    image_size: int = 112,
    pool: int = 64,
    seed: int = 0,
) -> Path:
    """Write the dataset into ``out_dir`` (reused when ``meta.json`` matches); returns it."""
    out = Path(out_dir)
    meta = {
        "num_classes": num_classes,
        "images_per_class": images_per_class,
        "image_size": image_size,
        "pool": pool,
        "seed": seed,
    }
    meta_path = out / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("params") == meta:
        return out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    images = face_pool(image_size, pool, seed)
    labels = np.repeat(np.arange(num_classes), images_per_class)
    payloads = (
        images[(c * 7 + j) % pool] for c in range(num_classes) for j in range(images_per_class)
    )
    write_insightface(out / "train.rec", out / "train.idx", labels, payloads, num_classes)
    write_property(out / "property", num_classes, (image_size, image_size))
    seconds = round(time.perf_counter() - t0, 2)
    size = (out / "train.rec").stat().st_size
    meta_path.write_text(json.dumps({"params": meta, "seconds": seconds, "bytes": size}))
    log.info(
        "synthetic rec: %d classes x %d images at %d px in %.1fs -> %s",
        num_classes,
        images_per_class,
        image_size,
        seconds,
        out,
    )
    return out
