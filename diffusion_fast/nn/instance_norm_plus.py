"""InstanceNorm++ (Song & Ermon 2019, Appendix A.1; official NCSNv2 ``InstanceNorm2dPlus``).

Instance normalisation removes each channel's spatial mean, and with it the colour shifts an
image model needs; InstanceNorm++ puts them back through a learned per-channel gain α:

    μ[n, c]  = mean_{h,w} x[n, c]                                  (N, C)
    μ̂[n, c]  = (μ[n, c] - mean_c μ[n]) / sqrt(var_c μ[n] + eps)    (var unbiased, as torch.var)
    y        = γ[c] · (IN(x)[n, c] + α[c] · μ̂[n, c]) + β[c]        (IN: instance norm, eps)

That is GroupNorm with one group per channel, weight γ, bias β and a per-(sample, channel) shift
γ·α·μ̂, which is how ``instance_norm_plus`` runs it: one ``group_norm_silu(..., shift=)`` call (any
backend) after an extra read of x for μ. ``silu=True`` also applies SiLU ("swish") in that call;
the ELU of NCSNv2 has no fused form and runs after it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_fast.ops.group_norm_silu import group_norm_silu

__all__ = ["InstanceNorm2dPlus", "instance_norm_plus", "instance_norm_plus_ref"]


def _check(x, alpha: Tensor, gamma: Tensor, beta: Optional[Tensor]) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"instance_norm_plus: x must be a floating Tensor, got {got}")
    if x.dim() < 3:
        raise ValueError(f"instance_norm_plus: x must have shape (N, C, *spatial), got {tuple(x.shape)}")
    c = x.shape[1]
    if c < 2:
        raise ValueError(f"instance_norm_plus: x needs at least 2 channels (μ̂ divides by their variance), got {c}")
    for name, t in (("alpha", alpha), ("gamma", gamma), ("beta", beta)):
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(f"instance_norm_plus: {name} must have shape ({c},) for {c} channels, "
                             f"got {tuple(t.shape)}")


def _normalized_means(x: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """μ̂: (N, C) in ``dtype``, the channel means standardised across channels (unbiased var)."""
    means = x.to(dtype).mean(dim=tuple(range(2, x.dim())))
    return (means - means.mean(1, keepdim=True)) / torch.sqrt(means.var(1, keepdim=True) + eps)


def instance_norm_plus_ref(x: Tensor, alpha: Tensor, gamma: Tensor, beta: Optional[Tensor] = None,
                           eps: float = 1e-5) -> Tensor:
    """Plain-PyTorch InstanceNorm++ (module doc), written as the official module computes it,
    in float32 (or x's dtype if wider). x: (N, C, *); alpha, gamma, beta: (C,)."""
    _check(x, alpha, gamma, beta)
    compute = torch.promote_types(x.dtype, torch.float32)
    h = x.to(compute)
    per_c = (1, -1) + (1,) * (x.dim() - 2)
    mu_hat = _normalized_means(h, eps, compute).reshape(h.shape[:2] + (1,) * (x.dim() - 2))
    h = F.instance_norm(h, eps=eps) + mu_hat * alpha.to(compute).reshape(per_c)
    h = gamma.to(compute).reshape(per_c) * h
    if beta is not None:
        h = h + beta.to(compute).reshape(per_c)
    return h.to(x.dtype)


def instance_norm_plus(x: Tensor, alpha: Tensor, gamma: Tensor, beta: Optional[Tensor] = None,
                       eps: float = 1e-5, *, silu: bool = False) -> Tensor:
    """InstanceNorm++ (then SiLU if ``silu``) through the fused ``group_norm_silu`` op.

    x: (N, C, *) float16/bfloat16/float32/float64; alpha, gamma, beta: (C,). Differentiable in
    every tensor. μ̂ and the shift γ·α·μ̂ are computed in float32 (float64 for float64 x).
    Returns x's shape and dtype, on the backend ``diffusion_fast.backends`` picks.
    """
    _check(x, alpha, gamma, beta)
    compute = torch.promote_types(x.dtype, torch.float32)
    shift = _normalized_means(x, eps, compute) * (gamma * alpha).to(compute)
    return group_norm_silu(x, x.shape[1], gamma, beta, eps, shift=shift, silu=silu)


class InstanceNorm2dPlus(nn.Module):
    """Drop-in for the official NCSNv2 ``InstanceNorm2dPlus(num_features, bias=True)``: the same
    parameters ``alpha``, ``gamma`` (both initialised N(1, 0.02²)) and ``beta`` (zeros; absent when
    ``bias=False``), so official state dicts load unchanged.

    forward(x: (N, num_features, H, W), silu=False) -> same shape and dtype.
    """

    def __init__(self, num_features: int, bias: bool = True, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        kw = dict(device=device, dtype=dtype)
        self.alpha = nn.Parameter(torch.empty(num_features, **kw))
        self.gamma = nn.Parameter(torch.empty(num_features, **kw))
        self.beta = nn.Parameter(torch.empty(num_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.alpha.normal_(1.0, 0.02)
            self.gamma.normal_(1.0, 0.02)
            if self.beta is not None:
                self.beta.zero_()

    def forward(self, x: Tensor, silu: bool = False) -> Tensor:
        return instance_norm_plus(x, self.alpha, self.gamma, self.beta, self.eps, silu=silu)

    def extra_repr(self) -> str:
        return f"{self.num_features}, bias={self.beta is not None}, eps={self.eps}"
