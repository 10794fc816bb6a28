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
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_fast import backends
from diffusion_fast.models import onednn
from diffusion_fast.models.nvae.layers import (
    FactorizedReduce,
    SqueezeExcitation,
    WNConv2d,
)
from diffusion_fast.models.param_cache import derived_params
from diffusion_fast.nn import BNSwish, DWConvBNSwish

__all__ = ["BN_MOMENTUM", "DecoderCombiner", "EncoderCombiner", "EncoderResidualCell", "GenerativeResidualCell"]

BN_MOMENTUM = 0.05
RESIDUAL_SCALE = 0.1


def _bn_affine(weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor, eps: float) -> tuple:
    """(a, c) in float64 with BatchNorm(x) = a * x + c per channel, from the running statistics (eval)."""
    a = weight.double() / (running_var.double() + eps).sqrt()
    return a, bias.double() - running_mean.double() * a


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

    Evaluation (sampling) with our backends and no gradient: BatchNorm with running statistics is the
    per-channel affine map a * x + c, so the branch runs as three ops instead of six,
        swish(W1' x + b1')  ->  dwconv_bn_swish  ->  W2' h + b2'  ->  SE,
        W1' = diag(a1) W1 diag(a0), b1' = a1 * (W1 c0) + c1,  W2' = diag(a2) W2, b2' = c2,
    (BN 0 before the expansion conv W1, BN 1 after it, BN 2 after the projection W2), the 1x1 convs as
    GEMMs over channels (on the CPU, channels_last: oneDNN with the packed weight and swish in the epilogue).
    Folded weights are kept while the parameters and running statistics are unchanged.
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
        self._up = len(up)  # branch[_up:] = bn0, conv1, bn_swish, dwconv, conv2, bn2, se

    def forward(self, x: Tensor) -> Tensor:
        if self._foldable():
            return self.skip(x) + RESIDUAL_SCALE * self._folded_branch(x)
        return self.skip(x) + RESIDUAL_SCALE * self.branch(x)

    def _foldable(self) -> bool:
        """Eval, our backends, no gradient, outside torch.compile, and the branch as built (not edited)."""
        if self.training or torch.compiler.is_compiling() or backends.current() == "torch":
            return False
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.branch.parameters()):
            return False
        b = self.branch[self._up:]  # bn0, conv1, bn_swish, dwconv, conv2, bn2, se
        kinds = (nn.BatchNorm2d, WNConv2d, BNSwish, DWConvBNSwish, WNConv2d, nn.BatchNorm2d)
        if len(b) != 7 or not all(isinstance(m, k) for m, k in zip(b, kinds)) or not b[2].swish:
            return False
        if any(c.kernel_size != (1, 1) or c.stride != (1, 1) or c.groups != 1 or c.bias is not None
               for c in (b[1], b[4])):
            return False
        return all(not bn.training and bn.running_mean is not None and bn.weight is not None for bn in self._bns())

    def _bns(self) -> tuple:
        """The three BatchNorms the fold removes: before the expansion conv, after it, after the projection."""
        b = self.branch[self._up:]
        return b[0], b[2].bn, b[5]

    def _fold_sources(self) -> tuple:
        b = self.branch[self._up:]
        bns = [t for bn in self._bns() for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)]
        return (b[1].normalized_weight(), b[4].normalized_weight(), *bns)

    def _folded_weights(self, w1, w2, *bns) -> tuple:
        """(W1', b1', W2', b2') of the class doc, computed in float64, in the weights' dtype."""
        (a0, c0), (a1, c1), (a2, c2) = (_bn_affine(*bns[4 * i:4 * i + 4], bn.eps)
                                        for i, bn in enumerate(self._bns()))
        w1, w2 = w1.double().flatten(1), w2.double().flatten(1)  # (hidden, in), (out, hidden)
        folded = (a1[:, None] * w1 * a0[None, :], a1 * (w1 @ c0) + c1, a2[:, None] * w2, c2)
        return tuple(t.to(bns[0].dtype) for t in folded)

    def _folded_branch(self, x: Tensor) -> Tensor:
        """The branch with folded BNs; on the CPU the expanded (6C-channel) tensors are channels_last whatever
        x's layout (the GEMMs and the depthwise kernel are faster so: 32x32x16x16 fp32, 1.8 -> 1.4 ms), only the
        C-channel input and output are converted."""
        for up in self.branch[:self._up]:
            x = up(x)
        nchw = x.device.type == "cpu" and not x.is_contiguous(memory_format=torch.channels_last)
        if nchw:
            x = x.contiguous(memory_format=torch.channels_last)
        sources = self._fold_sources()
        w1, b1, w2, b2 = derived_params(self, "_eval_fold", sources, self._folded_weights)
        h = self._pointwise(x, w1, b1, "swish", "_conv1_onednn", sources)
        h = self.branch[self._up + 3](h)  # dwconv 5x5 + BN + swish, fused
        h = self._pointwise(h, w2, b2, "none", "_conv2_onednn", sources)
        h = self.branch[self._up + 6](h)  # SE
        return h.contiguous() if nchw else h

    def _pointwise(self, x: Tensor, weight: Tensor, bias: Tensor, act: str, name: str, sources: tuple) -> Tensor:
        """act(1x1 conv): (N, I, H, W) -> (N, O, H, W), x's memory layout; weight (O, I)."""
        if x.is_contiguous(memory_format=torch.channels_last):  # memory is the (N, H, W, I) token matrix
            y = onednn.prepacked_linear(self, name, x.permute(0, 2, 3, 1), weight, bias, sources=sources, act=act)
            return y.permute(0, 3, 1, 2)
        y = F.conv2d(x, weight[:, :, None, None], bias)
        return F.silu(y) if act == "swish" else y


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
