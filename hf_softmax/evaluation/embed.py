"""Embeddings with flip test-time augmentation, shared by validation and evaluate.py.

``flip_embed``: images -> f(x) (+ f(flip x)) in one forward pass of 2B images; the
validation step (``HFSoftmaxModule``), closed-set scoring and ``embed_images`` all call it, so
every reported number uses the same features. ``embed_images`` decodes encoded images (a
``.bin``) in a thread pool, embeds them and L2-normalises.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.transforms import decode_image, normalize, resize
from hf_softmax.cores import usable_cores


def flip_embed(backbone: nn.Module, images: torch.Tensor, flip: bool) -> torch.Tensor:
    """images (B, C, H, W) normalised -> features (B, D): f(x) + f(flip x), or f(x).

    The flipped copy is the mirror image (last axis); both go through one forward pass.
    """
    if not flip:
        return backbone(images)
    e = backbone(torch.cat([images, images.flip(-1)]))  # (2B, D)
    return e[: len(images)] + e[len(images) :]


def decode_batch(
    images: list[bytes],
    start: int,
    size: int,
    source: str,
    pool: ThreadPoolExecutor,
    channels: int = 3,
) -> torch.Tensor:
    """-> (B, channels, size, size) uint8; PIL releases the GIL, so threads decode in parallel.

    Errors name ``source`` and the image's index ``start + i``.
    """

    def one(i: int) -> torch.Tensor:
        where = f"{source} image {start + i}"
        img = decode_image(images[i], where, size=(size, size), channels=channels)
        return resize(img, (size, size))

    return torch.stack(list(pool.map(one, range(len(images)))))


@torch.no_grad()
def embed_images(
    backbone: nn.Module,
    images: list[bytes],
    input_size: int,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    flip: bool = True,
    source: str = "",
    channels: int = 3,
) -> np.ndarray:
    """Encoded images -> (N, D) float32 L2-normalised embeddings (``flip_embed``).

    Images are decoded as RGB (channels 3) or grayscale (1), the backbone's in_channels.
    """
    out = []
    with ThreadPoolExecutor(max_workers=min(8, usable_cores())) as pool:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = decode_batch(chunk, start, input_size, source, pool, channels)
            e = flip_embed(backbone, normalize(batch).to(device), flip)
            out.append(F.normalize(e.float(), dim=1).cpu())
    return torch.cat(out).numpy()
