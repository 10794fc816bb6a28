"""NVAE residual cells and combiners (Vahdat & Kautz 2020, Fig. 3; official ``neural_operations.py``).

Every cell is ``skip(x) + 0.1 * branch(x)`` (the official code scales the branch by 0.1), the branch
ending in squeeze-excitation. Fused ops: the encoder cell's BN-Swish runs ``bn_swish``
(``diffusion_fast.nn.BNSwish``); the generative cell's depthwise 5x5 conv + BN + Swish runs
``dwconv_bn_swish`` (``DWConvBNSwish``) and its expansion BN-Swish runs ``bn_swish``.

The 1x1 convs and the depthwise conv of the generative cell are plain convs without bias, as in the
official inverted-residual cell (its Conv2D there has ``weight_norm=False``); the encoder cell's 3x3 convs
and the skip/combiner convs are weight-normalised (``WNConv2d``). BatchNorm momentum is 0.05 throughout.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffusion_fast.models.nvae.layers import (
    FactorizedReduce,
    SqueezeExcitation,
    WNConv2d,
)
from diffusion_fast.nn import BNSwish, DWConvBNSwish

__all__ = ["BN_MOMENTUM", "DecoderCombiner", "EncoderCombiner", "EncoderResidualCell", "GenerativeResidualCell"]

BN_MOMENTUM = 0.05
RESIDUAL_SCALE = 0.1


class EncoderResidualCell(nn.Module):
    """BN-Swish -> conv3x3 -> BN-Swish -> conv3x3 -> SE, plus skip (Fig. 3b).

    stride 2 halves H, W (first conv strided; skip = ``FactorizedReduce``). (N, C_in, H, W) -> (N, C_out, H/s, W/s).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, use_se: bool = True) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"EncoderResidualCell: stride must be 1 or 2, got {stride}")
        if stride == 1 and in_channels != out_channels:
            raise ValueError(f"EncoderResidualCell: stride 1 needs in_channels == out_channels, got "
                             f"{in_channels} and {out_channels}")
        self.skip = nn.Identity() if stride == 1 else FactorizedReduce(in_channels, out_channels)
        self.branch = nn.Sequential(
            BNSwish(in_channels, momentum=BN_MOMENTUM),
            WNConv2d(in_channels, out_channels, 3, stride=stride, padding=1),
            BNSwish(out_channels, momentum=BN_MOMENTUM),
            WNConv2d(out_channels, out_channels, 3, padding=1),
            SqueezeExcitation(out_channels) if use_se else nn.Identity(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + RESIDUAL_SCALE * self.branch(x)


class GenerativeResidualCell(nn.Module):
    """BN -> conv1x1 (x expand) -> BN-Swish -> dwconv5x5 -> BN-Swish -> conv1x1 -> BN -> SE, plus skip (Fig. 3a).

    ``upsample=True`` doubles H, W (nearest) before the branch and uses upsample + weight-normalised 1x1 conv
    as skip. (N, C_in, H, W) -> (N, C_out, H*u, W*u). ``expand`` is 6 in the decoder tower, 3 in post-processing.
    """

    def __init__(self, in_channels: int, out_channels: int, expand: int = 6, upsample: bool = False,
                 use_se: bool = True) -> None:
        super().__init__()
        if not upsample and in_channels != out_channels:
            raise ValueError(f"GenerativeResidualCell: without upsample in_channels must equal out_channels, got "
                             f"{in_channels} and {out_channels}")
        hidden = in_channels * expand
        up = [nn.Upsample(scale_factor=2, mode="nearest")] if upsample else []
        self.skip = nn.Sequential(*up, WNConv2d(in_channels, out_channels, 1)) if upsample else nn.Identity()
        self.branch = nn.Sequential(
            *up,
            nn.BatchNorm2d(in_channels, momentum=BN_MOMENTUM),
            WNConv2d(in_channels, hidden, 1, bias=False, weight_norm=False),
            BNSwish(hidden, momentum=BN_MOMENTUM),
            DWConvBNSwish(hidden, kernel_size=5, bias=False, momentum=BN_MOMENTUM),
            WNConv2d(hidden, out_channels, 1, bias=False, weight_norm=False),
            nn.BatchNorm2d(out_channels, momentum=BN_MOMENTUM),
            SqueezeExcitation(out_channels) if use_se else nn.Identity(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + RESIDUAL_SCALE * self.branch(x)


class EncoderCombiner(nn.Module):
    """Bottom-up feature + 1x1 conv of the top-down feature: the input of a group's posterior."""

    def __init__(self, enc_channels: int, dec_channels: int) -> None:
        super().__init__()
        self.conv = WNConv2d(dec_channels, enc_channels, 1)

    def forward(self, enc: Tensor, dec: Tensor) -> Tensor:
        return enc + self.conv(dec)


class DecoderCombiner(nn.Module):
    """1x1 conv of [top-down feature, z] concatenated on channels: feeds a group's latent into the decoder."""

    def __init__(self, channels: int, latent_channels: int) -> None:
        super().__init__()
        self.conv = WNConv2d(channels + latent_channels, channels, 1)

    def forward(self, s: Tensor, z: Tensor) -> Tensor:
        return self.conv(torch.cat([s, z], dim=1))
