"""Procedural cartoon faces for the demo data: identity parameters in families, and rendering.

Each identity is a parameter vector (face shape, skin/hair/eye/lip colours, eye spacing and size,
brows, nose, mouth shape, a cheek texture) rendered as a cartoon face. Identities come in families
of look-alikes: a family shares a base vector and members differ by small offsets, so the nearest
classes of any class are its family. Every image gets its own pose (shift, rotation, scale),
lighting (gain, colour cast, gradient) and pixel noise; ``encode_jpeg`` makes the stored bytes.
Deterministic given the numpy Generator.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ["encode_jpeg", "render_faces", "sample_identities"]

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


def encode_jpeg(arr: np.ndarray, quality: int) -> bytes:
    """``(H, W, 3)`` uint8 RGB -> JPEG bytes (4:4:4, no chroma subsampling)."""
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()
