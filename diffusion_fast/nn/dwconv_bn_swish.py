"""DWConvBNSwish and BNSwish: NVAE's depthwise-conv + BN + Swish and BN + Swish, fused.

Submodules keep NVAE's names and types (``conv``: a depthwise ``nn.Conv2d``, ``bn``: an
``nn.BatchNorm2d``), so state dicts (``conv.weight``, ``conv.bias``, ``bn.weight``, ``bn.bias``,
``bn.running_mean``, ``bn.running_var``, ``bn.num_batches_tracked``) load unchanged, and
``self.training``/``bn.momentum``/``bn.track_running_stats`` mean what they mean in ``nn.BatchNorm2d``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_fast.ops.dwconv_bn_swish import bn_swish, dwconv_bn_swish

__all__ = ["DWConvBNSwish", "BNSwish"]


def _bn_args(bn: nn.BatchNorm2d) -> dict:
    """nn.BatchNorm2d.forward's choices: training flag, running buffers, momentum (and the step count)."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    use_running = not bn.training or bn.track_running_stats
    return dict(
        training=bn.training or (bn.running_mean is None and bn.running_var is None),
        running_mean=bn.running_mean if use_running else None,
        running_var=bn.running_var if use_running else None,
        momentum=momentum,
        eps=bn.eps,
    )


class BNSwish(nn.Module):
    """``swish(bn(x))`` with ``bn = nn.BatchNorm2d(channels, eps, momentum, affine, track_running_stats)``."""

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, swish: bool = True) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.swish = swish

    def forward(self, x: Tensor) -> Tensor:
        a = _bn_args(self.bn)
        return bn_swish(x, self.bn.weight, self.bn.bias, a["running_mean"], a["running_var"], training=a["training"],
                        momentum=a["momentum"], eps=a["eps"], swish=self.swish)

    def extra_repr(self) -> str:
        return f"swish={self.swish}"


class DWConvBNSwish(nn.Module):
    """``swish(bn(conv(x)))``, conv a depthwise k x k ``nn.Conv2d`` (stride 1, padding k // 2).

    forward(x: (N, channels, H, W)) -> same shape, dtype and memory layout. A ``conv`` changed to
    something the fused op does not compute (stride, dilation, padding mode, groups) runs unfused.
    """

    def __init__(self, channels: int, kernel_size: int = 5, bias: bool = True, eps: float = 1e-5,
                 momentum: float = 0.1, device=None, dtype=None, *, swish: bool = True) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"DWConvBNSwish: kernel_size must be odd (padding k // 2 keeps H, W), got {kernel_size}")
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=bias,
                              device=device, dtype=dtype)
        self.bn = nn.BatchNorm2d(channels, eps, momentum, device=device, dtype=dtype)
        self.swish = swish

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, *, swish: bool = True) -> DWConvBNSwish:
        """A fused module that shares ``conv`` and ``bn`` (no copy)."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.conv, fused.bn, fused.swish = conv, bn, swish
        return fused

    def _fusable(self) -> bool:
        c, k = self.conv, self.conv.kernel_size
        return (k[0] == k[1] and k[0] % 2 == 1 and c.stride == (1, 1) and c.dilation == (1, 1)
                and c.padding == (k[0] // 2, k[0] // 2) and c.padding_mode == "zeros"
                and c.groups == c.in_channels == c.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        if not self._fusable():
            y = self.bn(self.conv(x))
            return F.silu(y) if self.swish else y
        a = _bn_args(self.bn)
        return dwconv_bn_swish(x, self.conv.weight, self.conv.bias, self.bn.weight, self.bn.bias, a["running_mean"],
                               a["running_var"], training=a["training"], momentum=a["momentum"], eps=a["eps"],
                               swish=self.swish)

    def extra_repr(self) -> str:
        return f"swish={self.swish}"
