"""Images: model outputs in [-1, 1] to uint8 pixels, PNG files (written atomically) and grids."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .fileio import write_atomic


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, rounding to nearest."""
    pixels = (x.detach().to(torch.float64) * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def _pil(pixels: np.ndarray) -> Image.Image:
    if pixels.shape[-1] == 1:
        return Image.fromarray(pixels[..., 0], mode="L")
    if pixels.shape[-1] == 3:
        return Image.fromarray(pixels, mode="RGB")
    raise ValueError(f"cannot write an image with {pixels.shape[-1]} channels as PNG (need 1 or 3)")


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    _pil(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(path: Path, pixels: np.ndarray) -> None:
    write_atomic(path, png_bytes(pixels))


def grid(pixels: np.ndarray, min_side: int = 256) -> np.ndarray:
    """Tile (N, H, W, C) images into a near-square grid, upscaled (nearest) to at least ``min_side``."""
    n, h, w, c = pixels.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        canvas[r * h:(r + 1) * h, q * w:(q + 1) * w] = pixels[k]
    scale = max(1, math.ceil(min_side / max(canvas.shape[:2])))
    return canvas.repeat(scale, axis=0).repeat(scale, axis=1)
