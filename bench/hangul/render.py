"""One glyph -> one 32x32 grayscale image: ink-box centring, scaling, seeded affine jitter.

A glyph is drawn once per (face, syllable) at ``SUPERSAMPLE`` x the output size and cropped
to its ink box; each image is then an affine warp of that crop into the output box (glyph's
longer side ~``fill`` of the box), optional stroke thickening, a box-filter reduction to the
output size (anti-aliasing) and optional blur. White glyph on black.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SUPERSAMPLE = 3


@dataclass(frozen=True)
class Jitter:
    """Amplitudes of the random per-image distortions (uniform in +-amplitude)."""

    rotate_deg: float = 5.0
    scale: float = 0.08
    shift_px: float = 2.0  # in output pixels
    thicken_p: float = 0.25  # probability of a 1-hi-res-pixel stroke dilation
    blur_p: float = 0.25  # probability of a Gaussian blur of radius U(0.2, 0.6) output px

    def scaled(self, k: float) -> Jitter:
        return Jitter(*(k * v for v in (self.rotate_deg, self.scale, self.shift_px)),
                      k * self.thicken_p, k * self.blur_p)  # fmt: skip


@lru_cache(maxsize=256)
def load_font(path: str, index: int, size: int) -> ImageFont.FreeTypeFont:
    """Cached per process (worker processes each load their own)."""
    return ImageFont.truetype(path, size=size, index=index)


def glyph(path: str, index: int, ch: str, size: int = 32) -> Image.Image | None:
    """The ink crop (mode L) of ``ch`` drawn at ``SUPERSAMPLE * size`` px; None if blank."""
    font = load_font(path, index, SUPERSAMPLE * size)
    x0, y0, x1, y1 = font.getbbox(ch)
    if x1 <= x0 or y1 <= y0:
        return None
    canvas = Image.new("L", (x1 - x0 + 2, y1 - y0 + 2), 0)
    ImageDraw.Draw(canvas).text((1 - x0, 1 - y0), ch, fill=255, font=font)
    box = canvas.getbbox()
    return canvas.crop(box) if box else None


def place(
    crop: Image.Image,
    size: int = 32,
    fill: float = 0.8,
    rng: np.random.Generator | None = None,
    jitter: Jitter | None = None,
) -> np.ndarray:
    """``(size, size)`` uint8: the crop centred, longer side ``fill`` of the box, jittered."""
    hi = SUPERSAMPLE * size
    w, h = crop.size
    s = fill * hi / max(w, h)
    angle, dx, dy, thicken, blur = 0.0, 0.0, 0.0, False, 0.0
    if jitter is not None and rng is not None:
        u = rng.uniform(-1.0, 1.0, 4)
        s *= 1.0 + jitter.scale * u[0]
        angle = math.radians(jitter.rotate_deg * u[1])
        dx, dy = jitter.shift_px * SUPERSAMPLE * u[2], jitter.shift_px * SUPERSAMPLE * u[3]
        p = rng.random(3)
        thicken = p[0] < jitter.thicken_p
        blur = float(0.2 + 0.4 * p[2]) if p[1] < jitter.blur_p else 0.0
    # output pixel (x, y) -> input (a x + b y + c, d x + e y + f): the inverse of
    # "centre the crop, rotate by angle, scale by s, move to the box centre + (dx, dy)"
    cos, sin = math.cos(angle) / s, math.sin(angle) / s
    ox, oy = hi / 2 + dx, hi / 2 + dy
    cx, cy = w / 2, h / 2
    data = (cos, sin, cx - cos * ox - sin * oy, -sin, cos, cy + sin * ox - cos * oy)
    img = crop.transform((hi, hi), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR)
    if thicken:
        img = img.filter(ImageFilter.MaxFilter(3))
    img = img.reduce(SUPERSAMPLE)
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(img, dtype=np.uint8)


def encode_png(arr: np.ndarray) -> bytes:
    """Lossless grayscale PNG bytes (deterministic for the same array and zlib)."""
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
