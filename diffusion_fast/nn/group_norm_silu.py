"""FusedGroupNormSiLU: nn.GroupNorm followed by SiLU, in one kernel."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from diffusion_fast.ops.group_norm_silu import group_norm_silu


class FusedGroupNormSiLU(nn.GroupNorm):
    """``silu(group_norm(x + pre_bias) * (1 + scale) + shift)``.

    Same constructor and parameters (``weight``, ``bias``) as ``nn.GroupNorm``, so its
    checkpoints load unchanged; ``silu=False`` gives a plain (fused-extras) GroupNorm.
    forward(x: (N, C, *), pre_bias/scale/shift: optional (N, C) per-sample tensors).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, silu: bool = True) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.silu = silu

    @classmethod
    def from_group_norm(cls, norm: nn.GroupNorm, *, silu: bool = True) -> "FusedGroupNormSiLU":
        """A fused module sharing ``norm``'s parameters (no copy)."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.num_groups, fused.num_channels = norm.num_groups, norm.num_channels
        fused.eps, fused.affine, fused.silu = norm.eps, norm.affine, silu
        fused.weight, fused.bias = norm.weight, norm.bias
        return fused

    def forward(self, x: Tensor, pre_bias: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                shift: Optional[Tensor] = None) -> Tensor:
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps,
                               pre_bias=pre_bias, scale=scale, shift=shift, silu=self.silu)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", silu={self.silu}"
