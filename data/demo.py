"""Embedded demo data: a procedural face-identity dataset written as real InsightFace RecordIO.

``ensure_demo()`` returns a directory holding ``train.rec``, ``train.idx``, ``property`` and a
verification set ``pairs.bin``, generating them on first use (~15 s on 2 cores) and caching them
under ``$HF_SOFTMAX_CACHE`` (default ``~/.cache/hf_softmax``) in ``demo-<hash of params>``.

Identities are procedural cartoon faces in families of look-alikes (``data.demo_faces``): the
nearest classes of any class are its family (the hard negatives HF-Softmax is meant to select);
every image of an identity gets its own pose, lighting and noise, then JPEG encoding.
``pairs.bin`` uses identities never seen in training, half same-identity pairs, half
different-identity pairs of which ``hard_fraction`` share a family.

Generation is deterministic: the same parameters give byte-identical files (on the same numpy /
Pillow build). Files are built in a temporary directory and renamed into place, so several
processes (DDP ranks) calling ``ensure_demo`` at once all end up with the same complete directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:  # POSIX only; elsewhere concurrent callers just race to the atomic rename
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

from data.demo_faces import encode_jpeg, render_faces, sample_identities
from data.layout import write_insightface, write_property

log = logging.getLogger(__name__)

__all__ = [
    "DemoParams",
    "FORMAT_VERSION",
    "build_demo",
    "demo_dir",
    "ensure_demo",
    "render_faces",
    "sample_identities",
]

# Bump when the rendering or file layout changes: it is part of the cache hash.
FORMAT_VERSION = 1
_FILES = ("train.rec", "train.idx", "property", "pairs.bin", "demo.json")


@dataclass(frozen=True)
class DemoParams:
    """What ``ensure_demo(**params)`` accepts; every field is part of the cache key."""

    num_classes: int = 2000  # training identities
    family_size: int = 8  # look-alike identities per family
    images_per_class: int = 12
    image_size: int = 32  # square images, H = W
    num_unseen: int = 300  # identities used only by pairs.bin
    images_per_unseen: int = 8
    num_pairs: int = 1200  # half same-identity, half different
    hard_fraction: float = 0.5  # of the different-identity pairs: same family
    family_spread: float = 0.07  # std of member offsets from the family base (unit params)
    jpeg_quality: int = 90
    seed: int = 0


def _render_encoded(
    params: np.ndarray, rng: np.random.Generator, p: DemoParams, chunk: int = 2048
) -> Iterator[bytes]:
    for start in range(0, len(params), chunk):
        for arr in render_faces(params[start : start + chunk], rng, p.image_size):
            yield encode_jpeg(arr, p.jpeg_quality)


def _make_pairs(
    rng: np.random.Generator, family: np.ndarray, per_class: int, p: DemoParams
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of image indices into the unseen images (identity i owns i*per_class ...).

    Returns:
        pairs: ``(P, 2)`` int64 image indices; issame: ``(P,)`` bool. Shuffled, so every fold
        of a sequential 10-fold split sees both kinds.
    """
    n = len(family)
    n_pos = p.num_pairs // 2
    n_neg = p.num_pairs - n_pos
    n_hard = int(round(n_neg * p.hard_fraction))
    ids = rng.integers(0, n, n_pos)
    a, b = (np.argsort(rng.random((n_pos, per_class)), axis=1)[:, :2]).T
    pos = np.stack([ids * per_class + a, ids * per_class + b], axis=1)

    neg_ids = []
    # hard: another member of the same family
    fam_members = {f: np.flatnonzero(family == f) for f in np.unique(family)}
    multi = np.array([i for i in range(n) if len(fam_members[family[i]]) > 1])
    if len(multi) == 0:  # every family has one member: no look-alike negatives exist
        n_hard = 0
    for i in rng.choice(multi, n_hard) if n_hard else ():
        others = fam_members[family[i]]
        others = others[others != i]
        neg_ids.append((i, others[rng.integers(len(others))]))
    # easy: any identity from a different family (with a single family, any other identity)
    single = len(fam_members) == 1
    while len(neg_ids) < n_neg:
        i, j = rng.integers(0, n, 2)
        if family[i] != family[j] or (single and i != j):
            neg_ids.append((i, j))
    neg_ids = np.array(neg_ids, dtype=np.int64)
    picks = rng.integers(0, per_class, (n_neg, 2))
    neg = neg_ids * per_class + picks
    pairs = np.concatenate([pos, neg]).astype(np.int64)
    issame = np.concatenate([np.ones(n_pos, bool), np.zeros(n_neg, bool)])
    order = rng.permutation(len(pairs))
    return pairs[order], issame[order]


def build_demo(out_dir: Path | str, params: DemoParams | None = None) -> Path:
    """Write the demo files into ``out_dir`` (created; no atomicity, see ``ensure_demo``)."""
    from data.verification import write_bin

    p = params or DemoParams()
    if p.num_classes < 1 or p.images_per_class < 1:
        raise ValueError(f"demo needs num_classes >= 1 and images_per_class >= 1, got {p}")
    if p.num_unseen < 2 or p.images_per_unseen < 2 or p.num_pairs < 2:
        raise ValueError(
            f"demo pairs need num_unseen >= 2, images_per_unseen >= 2, num_pairs >= 2; got {p}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(p.seed)
    ident, _ = sample_identities(rng, p.num_classes, p.family_size, p.family_spread)
    unseen, unseen_family = sample_identities(rng, p.num_unseen, p.family_size, p.family_spread)

    # InsightFace layout, images grouped by identity (data.layout.write_insightface)
    labels = np.repeat(np.arange(p.num_classes), p.images_per_class)
    encoded = _render_encoded(ident[labels], rng, p)
    _, totnum = write_insightface(
        out / "train.rec", out / "train.idx", labels, encoded, p.num_classes
    )
    write_property(out / "property", p.num_classes, (p.image_size, p.image_size))

    per = p.images_per_unseen
    unseen_images = list(_render_encoded(np.repeat(unseen, per, axis=0), rng, p))
    pairs, issame = _make_pairs(rng, unseen_family, per, p)
    write_bin(out / "pairs.bin", [unseen_images[k] for k in pairs.reshape(-1)], issame)
    meta = {"format_version": FORMAT_VERSION, "params": dataclasses.asdict(p), "totnum": totnum}
    (out / "demo.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    log.info(
        "demo data: %d classes x %d images + %d pairs written to %s in %.1f s",
        p.num_classes, p.images_per_class, p.num_pairs, out, time.perf_counter() - t0,
    )  # fmt: skip
    return out


def _params(kwargs: dict) -> DemoParams:
    known = {f.name for f in dataclasses.fields(DemoParams)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unknown demo parameter(s) {unknown}; valid: {sorted(known)}")
    return DemoParams(**kwargs)


def demo_dir(root: Path | str | None = None, **params) -> Path:
    """Where ``ensure_demo`` keeps the data for these params (nothing is created)."""
    p = _params(params)
    key = json.dumps(
        {"format_version": FORMAT_VERSION, **dataclasses.asdict(p)}, sort_keys=True
    ).encode()
    digest = hashlib.sha256(key).hexdigest()[:12]
    if root is None:
        root = os.environ.get("HF_SOFTMAX_CACHE") or Path.home() / ".cache" / "hf_softmax"
    return Path(root).expanduser() / f"demo-{digest}"


def ensure_demo(root: Path | str | None = None, **params) -> Path:
    """Return the demo data directory for ``params`` (see ``DemoParams``), building it once.

    Args:
        root: cache directory holding ``demo-<hash>`` folders; default ``$HF_SOFTMAX_CACHE`` or
            ``~/.cache/hf_softmax``.
        **params: ``DemoParams`` fields (unknown names raise TypeError).

    Returns:
        ``root/demo-<hash>`` containing train.rec, train.idx, property, pairs.bin, demo.json.
    """
    final = demo_dir(root, **params)
    if _complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # A lock file makes concurrent callers (DDP ranks) wait instead of all generating; the
    # temp-dir + rename below keeps it correct even where locks do not work (some NFS).
    with open(final.parent / f".{final.name}.lock", "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _complete(final):
                return final
            _build_atomically(final, _params(params))
        finally:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)
    return final


def _complete(path: Path) -> bool:
    return all((path / f).is_file() for f in _FILES)


def _build_atomically(final: Path, params: DemoParams) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any other
    try:
        log.info("generating demo data into %s (first use only)", final)
        build_demo(tmp, params)
        try:
            os.rename(tmp, final)  # atomic; fails if another process finished first
        except OSError:
            if not _complete(final):
                raise
            log.info("demo data in %s was built by another process; using it", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
