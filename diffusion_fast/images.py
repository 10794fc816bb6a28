"""Image grids: model-range tensors (B, C, H, W) in [-1, 1] -> one uint8 PNG (Pillow)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["to_uint8", "make_grid", "save_grid"]


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] floats -> 0..255 uint8, rounding to nearest (values outside are clipped)."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_grid(x: Tensor, *, nrow: int | None = None, padding: int = 1, scale: int = 1) -> Tensor:
    """(B, C, H, W) in [-1, 1] -> (rows*(H+p)+p, cols*(W+p)+p, C) uint8, each image upscaled
    ``scale`` times (nearest neighbour) so 8x8 digits stay visible."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"make_grid: x must be (B, 1 or 3, H, W), got {tuple(x.shape)}")
    images = to_uint8(x).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    b, c, h, w = images.shape
    cols = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = torch.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), 255, dtype=torch.uint8)
    for i in range(b):
        r, col = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = images[i].permute(1, 2, 0)
    return grid


def save_grid(x: Tensor, path, **kwargs) -> None:
    """Write ``make_grid(x, **kwargs)`` as a PNG."""
    from PIL import Image

    grid = make_grid(x, **kwargs).numpy()
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
