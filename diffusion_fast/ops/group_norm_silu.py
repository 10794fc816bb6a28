"""Fused GroupNorm + SiLU, with the two extras a diffusion UNet res block needs.

    h = x + pre_bias[:, :, None, ...]                    (optional; DDPM adds temb here)
    z = (h - mean_g(h)) * rstd_g(h) * weight[c] + bias[c]   (GroupNorm, fp32 statistics)
    z = z * (1 + scale[:, :, None, ...]) + shift[:, :, None, ...]   (optional "scale_shift")
    y = silu(z) = z * sigmoid(z)                         (optional; silu=False gives plain GroupNorm)

x: (N, C, *) float16/bfloat16/float32 (float64 on the CPU paths), NCHW-contiguous or
channels-last; weight, bias: (C,); pre_bias, scale, shift: (N, C) or (N, C, 1, ..., 1).
mean/rstd are (N, num_groups) float32 (float64 for float64 input) and kept for backward.

Backends: ``cuda`` (our extension: C++ on CPU tensors, CUDA on GPU tensors), ``triton``
and ``torch`` (``group_norm_silu_ref``), chosen per call by ``diffusion_fast.backends``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_fast import backends

__all__ = ["group_norm_silu", "group_norm_silu_ref"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def group_norm_silu_ref(
    x: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    pre_bias: Optional[Tensor] = None,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    silu: bool = True,
    upcast: bool = True,
) -> Tensor:
    """Plain PyTorch reference; ``upcast`` computes in float32 (or x's dtype if wider)."""
    out_dtype = x.dtype
    compute = torch.promote_types(x.dtype, torch.float32) if upcast else x.dtype
    per_nc = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)

    def nc(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.to(compute).reshape(per_nc)

    h = x.to(compute)
    if pre_bias is not None:
        h = h + nc(pre_bias)
    h = F.group_norm(h, num_groups, None if weight is None else weight.to(compute),
                     None if bias is None else bias.to(compute), eps)
    if scale is not None:
        h = h * (1 + nc(scale))
    if shift is not None:
        h = h + nc(shift)
    if silu:
        h = F.silu(h)
    return h.to(out_dtype)


# ---------------------------------------------------------------------------
# Op schemas, defined once. ``group_norm_silu_fwd``/``_bwd`` are implemented in C++
# (csrc/, CPU and CUDA dispatch keys); the ``_triton`` twins by kernels/group_norm_silu.py.
# Optional inputs that are absent get empty (0,) gradients from the backward op.
# ---------------------------------------------------------------------------
FWD_SCHEMA = (
    "(Tensor x, Tensor? weight, Tensor? bias, Tensor? pre_bias, Tensor? scale, Tensor? shift, "
    "int num_groups, float eps, bool silu) -> (Tensor y, Tensor mean, Tensor rstd)"
)
BWD_SCHEMA = (
    "(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor? pre_bias, Tensor? scale, "
    "Tensor? shift, Tensor mean, Tensor rstd, int num_groups, bool silu) -> "
    "(Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_pre_bias, "
    "Tensor grad_scale, Tensor grad_shift)"
)
OPS = {"cuda": "group_norm_silu", "triton": "group_norm_silu_triton"}

for _name in OPS.values():
    backends.LIBRARY.define(_name + "_fwd" + FWD_SCHEMA)
    backends.LIBRARY.define(_name + "_bwd" + BWD_SCHEMA)


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fake_fwd(x, weight, bias, pre_bias, scale, shift, num_groups, eps, silu):
    stats = x.new_empty((x.shape[0], num_groups), dtype=_stat_dtype(x))
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _grad_like(t: Optional[Tensor], x: Tensor) -> Tensor:
    return x.new_empty((0,)) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)


def _fake_bwd(grad_y, x, weight, bias, pre_bias, scale, shift, mean, rstd, num_groups, silu):
    return (torch.empty_like(x),) + tuple(_grad_like(t, x) for t in (weight, bias, pre_bias, scale, shift))


def _setup_context(ctx, inputs, output):
    x, weight, bias, pre_bias, scale, shift, num_groups, eps, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, pre_bias, scale, shift, mean, rstd)
    ctx.num_groups, ctx.silu = num_groups, silu
    ctx.mark_non_differentiable(mean, rstd)


def _make_backward(bwd_op):
    def backward(ctx, grad_y, _grad_mean, _grad_rstd):
        x, weight, bias, pre_bias, scale, shift, mean, rstd = ctx.saved_tensors
        grad_y = _like_layout(grad_y, x)
        grads = bwd_op(grad_y, x, weight, bias, pre_bias, scale, shift, mean, rstd, ctx.num_groups, ctx.silu)
        grad_x, rest = grads[0], grads[1:]
        optional = (weight, bias, pre_bias, scale, shift)
        return (grad_x,) + tuple(None if t is None else g for t, g in zip(optional, rest)) + (None, None, None)

    return backward


for _name in OPS.values():
    backends.register_fwd_bwd(_name, _fake_fwd, _fake_bwd, _make_backward, _setup_context)


# ---------------------------------------------------------------------------
# Layout helpers: kernels accept NC*-contiguous or channels-last ("C innermost") tensors.
# ---------------------------------------------------------------------------
def is_channels_last(x: Tensor) -> bool:
    """True when x is stored with C innermost (channels_last / channels_last_3d / NLC)."""
    return x.dim() >= 3 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def _like_layout(t: Tensor, x: Tensor) -> Tensor:
    if is_channels_last(x):
        return t.movedim(1, -1).contiguous().movedim(-1, 1)
    return t.contiguous()


# ---------------------------------------------------------------------------
# Argument checks: every bad input gets a ValueError/TypeError naming the argument.
# ---------------------------------------------------------------------------
def _check_tensor(name: str, t, device: Optional[torch.device]) -> None:
    """t is a floating tensor on ``device`` (any device for None)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"group_norm_silu: {name} must be a Tensor or None, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"group_norm_silu: {name} must be a floating tensor ({', '.join(map(str, FLOAT_DTYPES))}), "
                        f"got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"group_norm_silu: {name} is on {t.device} but x is on {device}; move them to one device")


def _check_inputs(x, num_groups, weight, bias, eps, pre_bias, scale, shift, silu) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"group_norm_silu: x must be a Tensor, got {type(x).__name__}")
    _check_tensor("x", x, None)
    if x.dim() < 2:
        raise ValueError(f"group_norm_silu: x must have shape (N, C, *), got a {x.dim()}-D tensor of shape "
                         f"{tuple(x.shape)}")
    n, c = x.shape[0], x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"group_norm_silu: num_groups must be an int, got {type(num_groups).__name__}")
    if num_groups <= 0 or c % num_groups != 0:
        raise ValueError(f"group_norm_silu: num_groups must be positive and divide the {c} channels of x, "
                         f"got {num_groups}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"group_norm_silu: eps must be a float, got {type(eps).__name__}")
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"group_norm_silu: eps must be finite and > 0, got {eps}")
    if not isinstance(silu, bool):
        raise TypeError(f"group_norm_silu: silu must be a bool, got {type(silu).__name__}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            _check_tensor(name, t, x.device)
            if tuple(t.shape) != (c,):
                raise ValueError(f"group_norm_silu: {name} must have shape ({c},) for {c} channels, "
                                 f"got {tuple(t.shape)}")
    for name, t in (("pre_bias", pre_bias), ("scale", scale), ("shift", shift)):
        if t is not None:
            _check_tensor(name, t, x.device)
            if tuple(t.shape[:2]) != (n, c) or any(s != 1 for s in t.shape[2:]):
                raise ValueError(
                    f"group_norm_silu: {name} must have shape ({n}, {c}) or ({n}, {c}, 1, ...), got {tuple(t.shape)}"
                )


_unsupported = backends.unsupported  # every dtype on our extension, all but float64 on Triton


def group_norm_silu(
    x: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    pre_bias: Optional[Tensor] = None,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    silu: bool = True,
) -> Tensor:
    """``silu(group_norm(x + pre_bias) * (1 + scale) + shift)`` in one pass (see module doc).

    Arguments follow ``torch.nn.functional.group_norm``; ``pre_bias``, ``scale`` and
    ``shift`` are per-(sample, channel) tensors of shape (N, C). Differentiable in every
    tensor argument. Returns a tensor with x's shape, dtype and memory layout.
    """
    _check_inputs(x, num_groups, weight, bias, eps, pre_bias, scale, shift, silu)
    backend = backends.select("group_norm_silu", x, _unsupported)
    if backend == "torch":
        y = group_norm_silu_ref(x, num_groups, weight, bias, eps, pre_bias=pre_bias, scale=scale, shift=shift,
                                silu=silu)
        return _like_layout(y, x) if is_channels_last(x) else y
    n, c = x.shape[0], x.shape[1]
    if not (x.is_contiguous() or is_channels_last(x)):
        x = x.contiguous()
    args = (x, _contiguous(weight), _contiguous(bias), _per_nc(pre_bias, n, c), _per_nc(scale, n, c),
            _per_nc(shift, n, c), num_groups, float(eps), silu)
    return _FWD[backend](*args)[0]


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _per_nc(t: Optional[Tensor], n: int, c: int) -> Optional[Tensor]:
    return None if t is None else t.reshape(n, c).contiguous()


_FWD = {backend: getattr(torch.ops.diffusion_fast, name + "_fwd").default for backend, name in OPS.items()}


# The Triton twins run kernels/group_norm_silu.py, imported on first use so that importing
# diffusion_fast never imports triton. CPU tensors reach them only under TRITON_INTERPRET=1.
def _triton_fwd(*args):
    from diffusion_fast.kernels import group_norm_silu as kernels

    return kernels.group_norm_silu_fwd(*args)


def _triton_bwd(*args):
    from diffusion_fast.kernels import group_norm_silu as kernels

    return kernels.group_norm_silu_bwd(*args)


for _key in ("CPU", "CUDA"):
    backends.LIBRARY.impl(OPS["triton"] + "_fwd", _triton_fwd, _key)
    backends.LIBRARY.impl(OPS["triton"] + "_bwd", _triton_bwd, _key)
