"""Pictures of samples: image grids, model-range tensors (B, C, H, W) in [-1, 1] -> one uint8 PNG
(Pillow); and scatter plots of 2-D points (N, 2), data beside samples -> one PNG (matplotlib)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["to_uint8", "make_grid", "save_grid", "save_scatter"]


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


def save_scatter(samples: Tensor, path, *, data: Tensor | None = None, title: str = "samples") -> None:
    """Write a PNG scatter plot of ``samples`` (N, 2), beside ``data`` (M, 2) on the same axes
    limits when given (matplotlib, Agg backend)."""
    if samples.dim() != 2 or samples.shape[1] != 2:
        raise ValueError(f"save_scatter: samples must be (N, 2) points, got {tuple(samples.shape)}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ([("data", data.detach().float().cpu(), "C1")] if data is not None else []) + [
        (title, samples.detach().float().cpu(), "C0")]
    everything = torch.cat([pts for _, pts, _ in panels])
    low, high = everything.min(0).values, everything.max(0).values
    pad = 0.05 * (high - low).clamp_min(1e-6)
    (x0, y0), (x1, y1) = (low - pad).tolist(), (high + pad).tolist()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    for ax, (name, pts, color) in zip(axes[0], panels, strict=True):
        ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=2, alpha=0.5, color=color)
        ax.set(title=f"{name} ({pts.shape[0]})", xlim=(x0, x1), ylim=(y0, y1), aspect="equal")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
