"""NVAE's inverse-autoregressive flow cells (Vahdat & Kautz 2020, Sec. 3 "normalizing flows", App. A; the
official ``neural_ar_operations.py`` and ``model.py``: ``ARConv2d``, ``ARInvertedResidual``, ``CellAR``,
``PairedCellAR``). NVAE applies ``num_nf`` paired cells to every posterior sample z_l (N, L, H, W).

Autoregressive order. A latent variable is (pixel p, channel c); in the default order p runs in raster order
(row by row, left to right) and, at one pixel, c runs 0..L-1. ``mirror=True`` reverses the pixel order
(the kernel is flipped in both spatial axes) and keeps the channel order. A masked conv lets output (p, c)
see inputs at earlier pixels (every channel) and, at p itself, the channels allowed by the channel mask
(``zero_diag`` excludes the output's own channel block). Stacking a zero-diagonal conv on top of
non-zero-diagonal ones keeps the whole network strictly autoregressive, so each ``CellAR`` is

    z' = z - mu(z),   d mu_i / d z_j = 0 unless j precedes i   =>   Jacobian unit lower-triangular, log|det| = 0

a volume-preserving shift (the official code keeps the affine/mixture-CDF variants switched off).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_fast.models.nvae.layers import WNConv2d

__all__ = ["ARConv2d", "ARInvertedResidual", "CellAR", "PairedCellAR", "autoregressive_mask"]


def autoregressive_mask(kernel_size: int, in_channels: int, out_channels: int, groups: int = 1,
                        zero_diag: bool = False, mirror: bool = False) -> Tensor:
    """0/1 mask (C_out, C_in / groups, k, k) of a masked conv (official ``create_conv_mask``).

    Spatially: rows above the centre and the centre row left of the centre are kept, the rest dropped. At the
    centre tap, dense convs (groups = 1) split the larger of C_in, C_out into blocks of C_max / C_min channels,
    one block per channel of the smaller side; output block/channel o sees input block/channel i iff i < o, or
    i == o when not ``zero_diag``. Depthwise convs (groups = C_in) keep the centre unless ``zero_diag``.
    ``mirror`` flips the mask in both spatial axes (reversed pixel order, same channel order).
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"autoregressive_mask: kernel_size must be odd, got {kernel_size}")
    if groups not in (1, in_channels):
        raise ValueError(f"autoregressive_mask: groups must be 1 or in_channels ({in_channels}), got {groups}")
    if groups == 1 and in_channels % out_channels and out_channels % in_channels:
        raise ValueError(f"autoregressive_mask: one of in_channels ({in_channels}) and out_channels "
                         f"({out_channels}) must divide the other")
    m = (kernel_size - 1) // 2
    mask = torch.zeros(out_channels, in_channels // groups, kernel_size, kernel_size)
    mask[:, :, :m, :] = 1
    mask[:, :, m, :m] = 1
    if groups == 1:
        out_block = torch.arange(out_channels) // max(out_channels // in_channels, 1)     # (C_out,)
        in_block = torch.arange(in_channels) // max(in_channels // out_channels, 1)      # (C_in,)
        seen = in_block[None, :] < out_block[:, None]
        if not zero_diag:
            seen |= in_block[None, :] == out_block[:, None]
        mask[:, :, m, m] = seen.to(mask.dtype)
    else:
        mask[:, :, m, m] = 0.0 if zero_diag else 1.0
    return mask.flip(2, 3) if mirror else mask


class ARConv2d(WNConv2d):
    """Masked, weight-normalised conv (official ``ARConv2d``): W = g * (V * M) / ||V * M||, M from
    ``autoregressive_mask``; g starts at ``init_scale * (||V * M|| + 1e-2)``. Stride 1, 'same' padding.
    x: (N, C_in, H, W) -> (N, C_out, H, W). Being a ``WNConv2d``, NVAE's spectral regulariser sees its masked
    weight (the official code regularises ``ARConv2d`` too)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, groups: int = 1, bias: bool = False,
                 zero_diag: bool = False, mirror: bool = False, init_scale: float = 1.0) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=bias)
        mask = autoregressive_mask(kernel_size, in_channels, out_channels, groups, zero_diag, mirror)
        self.register_buffer("mask", mask.to(self.weight.device), persistent=False)
        with torch.no_grad():
            norm = torch.linalg.vector_norm(self.weight * self.mask, dim=(1, 2, 3), keepdim=True)
            self.log_weight_norm.copy_(torch.log(norm + 1e-2) + math.log(init_scale))

    def normalized_weight(self) -> Tensor:
        w = self.weight * self.mask
        norm = torch.linalg.vector_norm(w, dim=(1, 2, 3), keepdim=True)
        return torch.exp(self.log_weight_norm) * w / (norm + 1e-5)

    def forward(self, x: Tensor) -> Tensor:
        # no data-dependent init (the official ARConv2d has none), so no host sync on ``init_done``
        return F.conv2d(x, self.normalized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class ARInvertedResidual(nn.Module):
    """The flow's feature network (official ``ARInvertedResidual``, expansion 6, 5x5 depthwise):
    z (N, L, H, W) -> masked conv3x3 (L -> 6L, zero diagonal) -> ELU -> masked depthwise 5x5 -> ELU -> (N, 6L, H, W).
    Feature block k at pixel p depends on z at earlier pixels and on channels < k at p only."""

    def __init__(self, latent_channels: int, expand: int = 6, kernel_size: int = 5, mirror: bool = False) -> None:
        super().__init__()
        self.hidden = latent_channels * expand
        self.net = nn.Sequential(
            ARConv2d(latent_channels, self.hidden, 3, zero_diag=True, mirror=mirror), nn.ELU(),
            ARConv2d(self.hidden, self.hidden, kernel_size, groups=self.hidden, mirror=mirror), nn.ELU())

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class CellAR(nn.Module):
    """One volume-preserving autoregressive flow step (official ``CellAR``, mixture-CDF variant off):

        z' = z - mu(z),   mu = masked conv1x1(ELU(ARInvertedResidual(z))) (6L -> L, bias, weight norm g x 0.1)

    z: (N, L, H, W) -> (z' (N, L, H, W), log|det dz'/dz| elementwise = zeros (N, L, H, W)).
    The official cell also receives the group's encoder feature but does not use it; neither does this one.
    """

    def __init__(self, latent_channels: int, mirror: bool = False) -> None:
        super().__init__()
        self.conv = ARInvertedResidual(latent_channels, mirror=mirror)
        self.mu = ARConv2d(self.conv.hidden, latent_channels, 1, bias=True, mirror=mirror, init_scale=0.1)

    def shift(self, z: Tensor) -> Tensor:
        """mu(z) (N, L, H, W): strictly autoregressive in z."""
        return self.mu(F.elu(self.conv(z)))

    def forward(self, z: Tensor) -> tuple:
        out = z - self.shift(z)
        return out, torch.zeros_like(out)

    def inverse(self, z_out: Tensor, max_iter: int | None = None) -> Tensor:
        """z with z - mu(z) = z_out, by the fixed-point iteration z <- z_out + mu(z). mu being strictly
        autoregressive, iteration k fixes the first k variables of the order, so it is exact after at most
        L * H * W iterations (the default bound); it stops as soon as z no longer changes."""
        z = z_out
        for _ in range(max_iter or z_out[0].numel()):
            z_next = z_out + self.shift(z)
            if torch.equal(z_next, z):
                break
            z = z_next
        return z


class PairedCellAR(nn.Module):
    """Two ``CellAR`` steps, the second in the mirrored order (official ``PairedCellAR``).
    z (N, L, H, W) -> (z'' (N, L, H, W), summed log-det (N, L, H, W), zeros)."""

    def __init__(self, latent_channels: int) -> None:
        super().__init__()
        self.cell1 = CellAR(latent_channels, mirror=False)
        self.cell2 = CellAR(latent_channels, mirror=True)

    def forward(self, z: Tensor) -> tuple:
        z, log_det1 = self.cell1(z)
        z, log_det2 = self.cell2(z)
        return z, log_det1 + log_det2

    def inverse(self, z_out: Tensor, max_iter: int | None = None) -> Tensor:
        return self.cell1.inverse(self.cell2.inverse(z_out, max_iter), max_iter)
