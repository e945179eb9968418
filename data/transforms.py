"""Image transforms for face records: decode encoded bytes, resize, flip, normalise.

Everything works on ``torch.uint8`` tensors laid out ``(C, H, W)`` (or ``(B, C, H, W)`` for the
element-wise ones), C = 3 (RGB) or 1 (grayscale, ``decode_image(channels=1)``), so the
expensive float conversion happens once, per batch, at the end.
PIL does the decoding (libjpeg-turbo for JPEG); torchvision is deliberately not used.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["ImageDecodeError", "decode_image", "hflip", "normalize", "resize"]


class ImageDecodeError(ValueError):
    """Encoded image bytes that PIL cannot turn into an RGB (or grayscale) image.

    The message names the source (e.g. ``"train.rec key 17"``), the number of bytes, their first
    bytes in hex and what was expected (a JPEG or PNG image).
    """


def _describe(data: bytes) -> str:
    return f"{len(data)} bytes starting with {bytes(data[:8]).hex() or '<empty>'}"


CHANNEL_MODES = {3: "RGB", 1: "L"}  # channels -> PIL mode


def decode_image(
    data: bytes, source: str = "", size: tuple[int, int] | None = None, channels: int = 3
) -> torch.Tensor:
    """Decode JPEG/PNG (or anything PIL reads) bytes into an RGB (or grayscale) tensor.

    Args:
        data: encoded image bytes.
        source: where the bytes came from, used in error messages (``"train.rec key 17"``).
        size: optional output ``(H, W)``. A JPEG larger than that is first decoded at the
            smallest power-of-two DCT reduction still >= ``size`` (libjpeg draft mode), then
            PIL resizes (bilinear, antialiased when shrinking). Images already at ``size`` are
            never touched, so same-size reads stay bit-exact.
        channels: 3 decodes as RGB, 1 as grayscale (PIL mode ``L``: ITU-R 601 luma of colour
            images, grayscale ones unchanged).

    Returns:
        ``(channels, H, W)`` uint8 (``size`` if given); gray, gray+alpha, palette, CMYK and
        RGBA images are converted to the wanted mode (alpha dropped).

    Raises:
        ImageDecodeError: the bytes are empty, truncated or not an image.
    """
    where = source or "<bytes>"
    if channels not in CHANNEL_MODES:
        raise ValueError(f"{where}: channels={channels}, expected one of {sorted(CHANNEL_MODES)}")
    mode = CHANNEL_MODES[channels]
    if not data:
        raise ImageDecodeError(f"{where}: empty image record, expected JPEG or PNG bytes")
    try:
        with warnings.catch_warnings():
            # PIL warns (DecompressionBombWarning etc.); a corrupt record is reported as an error.
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            if size is not None and img.format == "JPEG":
                h, w = size
                if h < img.height and w < img.width:
                    img.draft(mode, (w, h))
            if img.mode != mode:
                img = img.convert(mode)
            else:
                img.load()
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(img)
            if arr.ndim == 2:  # mode L: (H, W) -> (H, W, 1)
                arr = arr[:, :, None]
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for bad bytes
        raise ImageDecodeError(
            f"{where}: cannot decode image ({_describe(data)}): {type(exc).__name__}: {exc}; "
            "expected JPEG or PNG bytes"
        ) from exc
    if arr.ndim != 3 or arr.shape[2] != channels:
        raise ImageDecodeError(
            f"{where}: decoded to array of shape {arr.shape}, expected (H, W, {channels}) {mode}"
        )
    # (H, W, C) -> (C, H, W); copy so the tensor owns contiguous memory.
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(C, H, W)`` or ``(B, C, H, W)`` uint8 to ``size`` = (H', W'); no-op if equal.

    Bilinear with antialiasing (area-like when shrinking), rounded back to uint8. For tensors
    already in memory; the data pipeline resizes while decoding (``decode_image(size=...)``).
    """
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    batched = img.dim() == 4
    x = img if batched else img.unsqueeze(0)
    x = F.interpolate(
        x.float(), size=tuple(size), mode="bilinear", align_corners=False, antialias=True
    )
    x = x.round_().clamp_(0, 255).to(torch.uint8)
    return x if batched else x.squeeze(0)


def hflip(img: torch.Tensor) -> torch.Tensor:
    """Mirror left-right: the last (width) axis of ``(..., H, W)``; returns a new tensor."""
    if img.device.type == "cpu" and img.dtype == torch.uint8:
        # numpy: a (3,112,112) torch.flip crosses torch's parallel grain size, and in a busy
        # training process the intra-op pool can then stall for milliseconds per image
        return torch.from_numpy(np.ascontiguousarray(img.numpy()[..., ::-1]))
    return img.flip(-1)


def normalize(img_uint8: torch.Tensor) -> torch.Tensor:
    """``(x - 127.5) / 127.5`` as float32, same shape; maps 0..255 onto [-1, 1]."""
    if img_uint8.device.type == "cpu":
        # numpy on CPU: with num_workers=0 the collate runs in the training process, where
        # torch's intra-op thread pool can stall badly on a busy machine (measured 2 s vs 40 ms
        # per batch of 128 at 112x112 with 2 threads on 2 loaded cores). Same float32 values.
        x = img_uint8.numpy().astype(np.float32)
        x -= np.float32(127.5)
        x /= np.float32(127.5)
        return torch.from_numpy(x)
    return img_uint8.to(torch.float32).sub_(127.5).div_(127.5)
