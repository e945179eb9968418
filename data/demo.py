"""Embedded demo data: a procedural face-identity dataset written as real InsightFace RecordIO.

``ensure_demo()`` returns a directory holding ``train.rec``, ``train.idx``, ``property`` and a
verification set ``pairs.bin``, generating them on first use (~15 s on 2 cores) and caching them
under ``$HF_SOFTMAX_CACHE`` (default ``~/.cache/hf_softmax``) in ``demo-<hash of params>``.

Each identity is a parameter vector (face shape, skin/hair/eye/lip colours, eye spacing and size,
brows, nose, mouth shape, a cheek texture) rendered as a cartoon face. Identities come in families
of look-alikes: a family shares a base vector and members differ by small offsets, so the nearest
classes of any class are its family (the hard negatives HF-Softmax is meant to select). Every image
of an identity gets its own pose (shift, rotation, scale), lighting (gain, colour cast, gradient)
and pixel noise, then JPEG encoding. ``pairs.bin`` uses identities never seen in training, half
same-identity pairs, half different-identity pairs of which ``hard_fraction`` share a family.

Generation is deterministic: the same parameters give byte-identical files (on the same numpy /
Pillow build). Files are built in a temporary directory and renamed into place, so several
processes (DDP ranks) calling ``ensure_demo`` at once all end up with the same complete directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
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
from PIL import Image

try:  # POSIX only; elsewhere concurrent callers just race to the atomic rename
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

from data.layout import write_property

log = logging.getLogger(__name__)

__all__ = ["DemoParams", "FORMAT_VERSION", "build_demo", "demo_dir", "ensure_demo", "render_faces"]

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


# ---------------------------------------------------------------------------------------------
# identity parameters: each column is a unit-interval parameter mapped to a range at render time
_PARAMS = [
    "bg_r", "bg_g", "bg_b",
    "skin_r", "skin_g", "skin_b",
    "hair_r", "hair_g", "hair_b",
    "eye_r", "eye_g", "eye_b",
    "lip_r", "lip_g", "lip_b",
    "face_rx", "face_ry", "hairline", "hair_width",
    "eye_sep", "eye_y", "eye_rx", "eye_ry",
    "brow_gap", "brow_tilt", "brow_thick",
    "nose_len", "nose_w",
    "mouth_y", "mouth_w", "mouth_h", "mouth_curve",
    "tex_freq", "tex_angle", "tex_amp", "tex_phase",
]  # fmt: skip
_P = {name: i for i, name in enumerate(_PARAMS)}


def sample_identities(
    rng: np.random.Generator, num: int, family_size: int, spread: float
) -> tuple[np.ndarray, np.ndarray]:
    """Identity parameter vectors in families.

    Returns:
        params: ``(num, K)`` float64 in [0, 1]; family: ``(num,)`` int64 family id of each.
    """
    num_families = -(-num // family_size)
    base = rng.random((num_families, len(_PARAMS)))
    family = np.arange(num) // family_size
    offset = rng.normal(0.0, spread, (num, len(_PARAMS)))
    p = base[family] + offset
    # reflect into [0, 1] so offsets near the border keep their size
    p = np.abs(p)
    p = 1.0 - np.abs(1.0 - p)
    return np.clip(p, 0.0, 1.0), family.astype(np.int64)


def _lerp(u: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return lo + (hi - lo) * u


def _ellipse(u, v, cx, cy, rx, ry, px):
    """Anti-aliased filled ellipse coverage in [0, 1]; all args broadcast over (B, H, W)."""
    du = (u - cx) / rx
    dv = (v - cy) / ry
    du *= du
    dv *= dv
    du += dv
    d = np.sqrt(du, out=du)
    # signed distance ~ (1 - d) * min radius; ramp one pixel wide
    d = (1.0 - d) * (np.minimum(rx, ry) / px)
    d += 0.5
    return np.clip(d, 0.0, 1.0, out=d)


def _over(canvas: np.ndarray, mask: np.ndarray, color: np.ndarray) -> np.ndarray:
    """Composite ``color`` (B,3,1,1) over ``canvas`` (B,3,H,W) with coverage ``mask`` (B,H,W)."""
    # channel axis before the pixels: numpy's inner loops then run over H*W, not over 3
    diff = color - canvas
    diff *= mask[:, None]
    canvas += diff
    return canvas


def render_faces(
    params: np.ndarray, rng: np.random.Generator, size: int = 32, jitter: bool = True
) -> np.ndarray:
    """Render one image per row of ``params`` with random pose, lighting and noise.

    Args:
        params: ``(B, K)`` identity parameters in [0, 1] (see ``sample_identities``).
        rng: source of the per-image jitter (consumed in a fixed order: deterministic).
        size: output height = width in pixels.
        jitter: False renders the canonical pose/lighting without noise (for inspection).

    Returns:
        ``(B, size, size, 3)`` uint8 RGB.
    """
    b = params.shape[0]
    params = params.astype(np.float32)
    col = {k: params[:, i].reshape(b, 1, 1) for k, i in _P.items()}

    def color(prefix: str, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
        c = np.stack([col[prefix + "_r"], col[prefix + "_g"], col[prefix + "_b"]], axis=1)
        return _lerp(c, lo, hi)  # (B,3,1,1)

    # per-image jitter: pose (shift, rotation, scale), lighting (gain, cast, gradient), noise
    j = rng.standard_normal((b, 9), dtype=np.float32) if jitter else np.zeros((b, 9), np.float32)
    tx, ty = 0.06 * j[:, 0], 0.06 * j[:, 1]
    theta = np.deg2rad(6.0) * j[:, 2]
    scale = np.exp(0.05 * j[:, 3])
    gain = np.exp(0.12 * j[:, 4])
    cast = (
        1.0 + 0.04 * rng.standard_normal((b, 3), dtype=np.float32)
        if jitter
        else np.ones((b, 3), np.float32)
    )
    grad_amp = 0.12 * np.abs(j[:, 5])
    grad_dir = np.arctan2(j[:, 6], j[:, 7])

    # pixel grid in [-1, 1], then into face coordinates by the inverse similarity transform
    g = ((np.arange(size) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
    y, x = np.meshgrid(g, g, indexing="ij")  # (H, W)
    px = 2.0 / size
    x = x[None] - tx.reshape(b, 1, 1)
    y = y[None] - ty.reshape(b, 1, 1)
    c, s = np.cos(theta).reshape(b, 1, 1), np.sin(theta).reshape(b, 1, 1)
    sc = scale.reshape(b, 1, 1)
    u = (c * x + s * y) / sc
    v = (-s * x + c * y) / sc
    pxs = px / sc

    img = np.broadcast_to(color("bg", 0.1, 0.9), (b, 3, size, size)).copy()

    face_rx = _lerp(col["face_rx"], 0.50, 0.78)
    face_ry = _lerp(col["face_ry"], 0.66, 0.92)
    face_cy = 0.08
    # hair: a larger ellipse behind the face, visible above the hairline
    hair_w = _lerp(col["hair_width"], 1.02, 1.25)
    hair = _ellipse(u, v, 0.0, face_cy - 0.06, face_rx * hair_w, face_ry * 1.08, pxs)
    img = _over(img, hair, color("hair", 0.0, 0.85))

    skin = color("skin", 0.3, 1.0)
    # cheek texture: oriented stripes modulating the skin
    freq = _lerp(col["tex_freq"], 2.0, 7.0) * np.pi
    ang = col["tex_angle"] * np.pi
    wave = np.sin(freq * (u * np.cos(ang) + v * np.sin(ang)) + col["tex_phase"] * 2 * np.pi)
    tex = 1.0 + _lerp(col["tex_amp"], 0.0, 0.28) * wave  # (B,H,W)
    face = _ellipse(u, v, 0.0, face_cy, face_rx, face_ry, pxs)
    img = _over(img, face, skin * tex[:, None])
    # hairline: hair covers the top of the face down to a per-identity height
    hairline = face_cy - face_ry + _lerp(col["hairline"], 0.12, 0.5)
    cap = np.clip(0.5 + (hairline - v) / pxs, 0.0, 1.0) * face
    img = _over(img, cap, color("hair", 0.0, 0.85))

    eye_sep = _lerp(col["eye_sep"], 0.17, 0.42)
    eye_y = _lerp(col["eye_y"], -0.22, 0.02)
    eye_rx = _lerp(col["eye_rx"], 0.07, 0.17)
    eye_ry = _lerp(col["eye_ry"], 0.05, 0.13)
    white = np.full((1, 3, 1, 1), 0.95, np.float32)
    eye_col = color("eye", 0.0, 0.8)
    brow_gap = _lerp(col["brow_gap"], 0.06, 0.16)
    brow_tilt = _lerp(col["brow_tilt"], -0.35, 0.35)
    brow_h = _lerp(col["brow_thick"], 0.025, 0.06)
    for side in (-1.0, 1.0):
        ex = side * eye_sep
        img = _over(img, _ellipse(u, v, ex, eye_y, eye_rx, eye_ry, pxs), white)
        img = _over(img, _ellipse(u, v, ex, eye_y, eye_rx * 0.55, eye_ry * 0.8, pxs), eye_col)
        # brow: thin ellipse above the eye, tilted symmetrically (mirror-invariant identity)
        by = eye_y - eye_ry - brow_gap + side * brow_tilt * (u - ex)
        brow = _ellipse(u, v - by + eye_y, ex, eye_y, eye_rx * 1.3, brow_h, pxs)
        img = _over(img, brow, color("hair", 0.0, 0.6))

    nose_len = _lerp(col["nose_len"], 0.08, 0.26)
    nose_w = _lerp(col["nose_w"], 0.04, 0.10)
    nose = _ellipse(u, v, 0.0, eye_y + 0.08 + nose_len / 2, nose_w, nose_len / 2, pxs)
    img = _over(img, nose, skin * 0.75)

    mouth_y = _lerp(col["mouth_y"], 0.32, 0.55)
    mouth_w = _lerp(col["mouth_w"], 0.14, 0.36)
    mouth_h = _lerp(col["mouth_h"], 0.03, 0.09)
    curve = _lerp(col["mouth_curve"], -0.9, 0.9)
    mv = v + curve * (u / mouth_w) ** 2 * 0.08
    mouth = _ellipse(u, mv, 0.0, mouth_y, mouth_w, mouth_h, pxs)
    img = _over(img, mouth, color("lip", 0.15, 0.95))

    # lighting in image coordinates: gain, colour cast, linear gradient; then sensor noise
    gx = x * np.cos(grad_dir).reshape(b, 1, 1) + y * np.sin(grad_dir).reshape(b, 1, 1)
    light = gain.reshape(b, 1, 1) * (1.0 + grad_amp.reshape(b, 1, 1) * gx)
    img *= light[:, None]
    img *= np.reshape(cast, (-1, 3, 1, 1)) * np.float32(255.0)
    if jitter:
        noise = rng.standard_normal(img.shape, dtype=np.float32)
        noise *= np.float32(3.0)
        img += noise
    np.rint(img, out=img)
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8).transpose(0, 2, 3, 1)  # (B, H, W, 3)


def _encode_jpeg(arr: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _render_encoded(
    params: np.ndarray, rng: np.random.Generator, p: DemoParams, chunk: int = 2048
) -> Iterator[bytes]:
    for start in range(0, len(params), chunk):
        for arr in render_faces(params[start : start + chunk], rng, p.image_size):
            yield _encode_jpeg(arr, p.jpeg_quality)


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
    from data.recordio import IRHeader, RecordWriter, pack
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

    # InsightFace layout: key 0 header (imgnum, totnum); keys 1..imgnum-1 images grouped by
    # identity; keys imgnum..totnum-1 one record per identity with label (first, end).
    n_img = p.num_classes * p.images_per_class
    imgnum, totnum = 1 + n_img, 1 + n_img + p.num_classes
    labels = np.repeat(np.arange(p.num_classes), p.images_per_class)
    with RecordWriter(out / "train.rec", out / "train.idx") as w:
        w.write_idx(0, pack(IRHeader(2, np.array([imgnum, totnum], np.float32), 0, 0), b""))
        encoded = _render_encoded(ident[labels], rng, p)
        for key, (label, jpeg) in enumerate(zip(labels, encoded, strict=True), start=1):
            w.write_idx(key, pack(IRHeader(0, float(label), key, 0), jpeg))
        for c in range(p.num_classes):
            first = 1 + c * p.images_per_class
            rng_label = np.array([first, first + p.images_per_class], np.float32)
            w.write_idx(imgnum + c, pack(IRHeader(2, rng_label, imgnum + c, 0), b""))
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
