"""RefineNet blocks of the NCSN/NCSNv2 score networks (Lin et al. 2017, "RefineNet", Sec. 3.2;
official ermongroup/ncsnv2 ``models/layers.py``): RCU, CRP, MSF and the RefineBlock joining them.

The NCSNv2 refinement path has no normalisation: only activations and convolutions. Module and
parameter names follow the official code (``adapt_convs.0.1_2_conv``, ``msf.convs.1``,
``crp.convs.0``, ``output_convs.3_1_conv``), so official state dicts load unchanged.
Tensors are NCHW; ``act`` is an elementwise function (ELU for NCSNv2).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_fast.models.blocks import Conv2d

__all__ = ["conv3x3", "RCUBlock", "CRPBlock", "MSFBlock", "RefineBlock"]

Act = Callable[[Tensor], Tensor]


def conv3x3(in_ch: int, out_ch: int, *, bias: bool = True, dilation: int = 1) -> Conv2d:
    """3x3 convolution, stride 1, size-preserving padding (= dilation); PyTorch's default init."""
    return Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=bias)


class RCUBlock(nn.Module):
    """Residual conv units: ``n_blocks`` times ``x = x + (conv ∘ act)^n_stages (x)``.

    Convs are 3x3, features -> features, no bias, named ``{block}_{stage}_conv`` (1-based).
    forward(x: (N, features, H, W)) -> same shape.
    """

    def __init__(self, features: int, n_blocks: int, n_stages: int, act: Act) -> None:
        super().__init__()
        self.n_blocks, self.n_stages, self.act = n_blocks, n_stages, act
        for i in range(n_blocks):
            for j in range(n_stages):
                self.add_module(f"{i + 1}_{j + 1}_conv", conv3x3(features, features, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        for i in range(self.n_blocks):
            h = x
            for j in range(self.n_stages):
                h = getattr(self, f"{i + 1}_{j + 1}_conv")(self.act(h))
            x = x + h
        return x


class CRPBlock(nn.Module):
    """Chained residual pooling: ``x = act(x)``, then ``n_stages`` times
    ``path = conv(pool(path)); x = x + path`` with a 5x5 stride-1 max pool (average pool when
    ``maxpool=False``) and 3x3 bias-free convs. forward(x: (N, features, H, W)) -> same shape.
    """

    def __init__(self, features: int, n_stages: int, act: Act, *, maxpool: bool = True) -> None:
        super().__init__()
        self.convs = nn.ModuleList(conv3x3(features, features, bias=False) for _ in range(n_stages))
        self.maxpool, self.act = maxpool, act

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(x)
        path = x
        pool = F.max_pool2d if self.maxpool else F.avg_pool2d
        for conv in self.convs:
            path = conv(pool(path, 5, stride=1, padding=2))
            x = x + path
        return x


class MSFBlock(nn.Module):
    """Multi-resolution fusion: ``sum_i resize(conv_i(x_i), shape)``, conv_i 3x3 with bias from
    ``in_planes[i]`` to ``features`` channels, bilinear resize with ``align_corners=True``.

    forward(xs: list of (N, in_planes[i], H_i, W_i), shape: (H, W)) -> (N, features, H, W).
    """

    def __init__(self, in_planes: Sequence[int], features: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(conv3x3(c, features) for c in in_planes)

    def forward(self, xs: Sequence[Tensor], shape) -> Tensor:
        out = None
        for conv, x in zip(self.convs, xs, strict=True):
            h = conv(x)
            if tuple(h.shape[2:]) != tuple(shape):
                h = F.interpolate(h, size=tuple(shape), mode="bilinear", align_corners=True)
            out = h if out is None else out + h
        return out


class RefineBlock(nn.Module):
    """RefineNet block: RCU (2 blocks x 2 stages) on each input, MSF to fuse them (skipped for
    the single-input ``start`` block), CRP (2 stages), then an output RCU of 1 block (3 for the
    ``end`` block) x 2 stages.

    forward(xs: list of (N, in_planes[i], H_i, W_i), shape: (H, W)) -> (N, features, H, W).
    """

    def __init__(self, in_planes: Sequence[int], features: int, act: Act, *, start: bool = False,
                 end: bool = False, maxpool: bool = True) -> None:
        super().__init__()
        if start and (len(in_planes) != 1 or in_planes[0] != features):
            raise ValueError(f"RefineBlock: a start block takes one input of {features} channels, got {in_planes}")
        self.adapt_convs = nn.ModuleList(RCUBlock(c, 2, 2, act) for c in in_planes)
        self.output_convs = RCUBlock(features, 3 if end else 1, 2, act)
        self.msf = None if start else MSFBlock(in_planes, features)
        self.crp = CRPBlock(features, 2, act, maxpool=maxpool)

    def forward(self, xs: Sequence[Tensor], shape) -> Tensor:
        hs = [rcu(x) for rcu, x in zip(self.adapt_convs, xs, strict=True)]
        h = hs[0] if self.msf is None else self.msf(hs, shape)
        return self.output_convs(self.crp(h))
