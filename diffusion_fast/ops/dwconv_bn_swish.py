"""Fused depthwise conv + BatchNorm + Swish (NVAE's cell middle) and fused BatchNorm + Swish.

NVAE (Vahdat & Kautz 2020, Fig. 3a) builds its generative residual cell as
BN -> 1x1 conv (x6) -> BN-Swish -> depthwise 5x5 conv -> BN-Swish -> 1x1 conv -> BN -> SE.
``dwconv_bn_swish`` fuses the middle, ``bn_swish`` the first BN-Swish:

    z[n,c]  = sum_{i,j} w[c,0,i,j] * x[n,c,h+i-R,w+j-R] + conv_bias[c]   (k x k, R = k // 2, zero padding)
    zn      = (z - mean[c]) * rstd[c] * bn_weight[c] + bn_bias[c],  rstd = 1 / sqrt(var + eps)
    y       = swish(zn) = zn * sigmoid(zn)                          (swish=False: y = zn)

``bn_swish`` is the same with z = x. BatchNorm follows ``nn.BatchNorm2d`` (Ioffe & Szegedy 2015):
training uses the batch statistics of z over (N, H, W) (biased variance) and updates the running
buffers in place, ``running = (1 - momentum) * running + momentum * stat`` with the unbiased variance
(M / (M - 1), M = N*H*W); eval uses ``running_mean``/``running_var``, folded into one scale and
shift per channel. Statistics are fp32 (fp64 for fp64 x); mean/var (C,) are kept for backward.

x: (N, C, H, W) float16/bfloat16/float32 (float64 on the CPU paths), NCHW-contiguous or channels-last;
conv_weight: (C, 1, k, k), k odd; conv_bias, bn_weight, bn_bias, running_mean, running_var: (C,)
or None. Our kernels take k in {1, 3, 5}; other odd k falls back to the reference.

Passes over activation-sized memory (R = one read, W = one write of an x-sized tensor):

    eager, training   fwd: conv 1R+1W, BN stats 1R, BN apply 1R+1W, swish 1R+1W        = 4R+3W,
                           and keeps z and zn (two extra activations) for backward;
                      bwd: swish 2R+1W, BN 3R+1W, conv dgrad 1R+1W, wgrad 2R          = 8R+3W.
    ours, training    fwd: stats pass (conv recomputed per tile, per-tile partial sums) 1R,
                           apply pass (conv again, normalise, swish) 1R+1W              = 2R+1W,
                           keeps only x and the (C,) statistics. The CUDA tiled kernels at 16 bits
                           (NCHW, k 3/5) conv once instead: stats pass 1R+1W (z' less its tile's
                           mean, into y), then y normalised in place 1R+1W = 2R+2W, as the second
                           conv's k*k FMAs per output bound them on GPUs;
                      bwd: sums pass (x, dy -> sum dzn, sum dzn*zhat) 2R, then a pass that
                           rebuilds dz and writes dx and the weight grads 2R+1W         = 4R+1W
                           (the CUDA shared-memory tiled kernels, NCHW x, k 3/5: so, each tile
                           rebuilding dz over its k // 2 halo from x over a k - 1 halo; Triton and
                           the other CUDA kernels write dz to an fp32 scratch in between: 6R+2W).
    ours, eval        fwd 1R+1W; bwd 2R+1W in C++ (no reduction is needed before dz; CUDA and
                      Triton run their training passes, 4R+1W tiled, else 6R+2W).
    The C++ CPU kernels fold BatchNorm into the conv in eval (one pass, 1R+1W). In training they work
    channel by channel and keep a channel's conv output (and dzn) in a scratch buffer when it fits
    (N*H*W*4 bytes per channel, 1 MiB per thread), so their second passes read cache: NCHW training
    fwd 1R+1W, bwd 2R+1W from memory (larger channels: as above, recomputing). The channels-last
    forward walks x in memory order, all channels of a row at once: training 2R+1W (conv twice), or,
    for float32/float64 when no backward follows (the fwd ops' ``needs_grad`` hint, e.g. NVAE's
    BatchNorm re-adjustment under no_grad), 1R+1W then 1R+1W in place (z kept in y: one conv).

Backends: ``cuda`` (our extension: C++ on CPU tensors, CUDA on GPU tensors), ``triton`` and
``torch`` (``dwconv_bn_swish_ref``/``bn_swish_ref``), chosen per call by ``diffusion_fast.backends``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_fast import backends
from diffusion_fast.ops.group_norm_silu import _like_layout, is_channels_last

__all__ = ["dwconv_bn_swish", "dwconv_bn_swish_ref", "bn_swish", "bn_swish_ref"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_SIZES = (1, 3, 5)  # what our kernels implement


# ---------------------------------------------------------------------------
# References (plain PyTorch). Running stats are updated in place, as F.batch_norm does.
# ---------------------------------------------------------------------------
def _bn_swish_compute(z, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, swish, compute):
    def cast(t):
        return None if t is None else t.to(compute)

    rm, rv = cast(running_mean), cast(running_var)  # copies unless already in the compute dtype
    zn = F.batch_norm(z, rm, rv, cast(bn_weight), cast(bn_bias), training, momentum, eps)
    if training and running_mean is not None and rm is not running_mean:
        with torch.no_grad():
            running_mean.copy_(rm)
            running_var.copy_(rv)
    return F.silu(zn) if swish else zn


def bn_swish_ref(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                 running_var: Optional[Tensor], *, training: bool, momentum: float = 0.1, eps: float = 1e-5,
                 swish: bool = True, upcast: bool = True) -> Tensor:
    """``swish(batch_norm(x))`` in plain PyTorch; ``upcast`` computes in float32 (or x's dtype if wider)."""
    compute = torch.promote_types(x.dtype, torch.float32) if upcast else x.dtype
    y = _bn_swish_compute(x.to(compute), bn_weight, bn_bias, running_mean, running_var, training, momentum, eps,
                          swish, compute)
    return y.to(x.dtype)


def dwconv_bn_swish_ref(x: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], bn_weight: Optional[Tensor],
                        bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor], *,
                        training: bool, momentum: float = 0.1, eps: float = 1e-5, swish: bool = True,
                        upcast: bool = True) -> Tensor:
    """``swish(batch_norm(depthwise_conv2d(x)))`` in plain PyTorch (module doc); ``upcast`` as in ``bn_swish_ref``."""
    compute = torch.promote_types(x.dtype, torch.float32) if upcast else x.dtype
    k = conv_weight.shape[-1]
    z = F.conv2d(x.to(compute), conv_weight.to(compute), None if conv_bias is None else conv_bias.to(compute),
                 padding=k // 2, groups=x.shape[1])
    y = _bn_swish_compute(z, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, swish, compute)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------
# Op schemas, defined once. ``dwconv_bn_swish_*``/``bn_swish_*`` are implemented in C++ (csrc/, CPU and
# CUDA keys), the ``_triton`` twins by kernels/dwconv_bn_swish.py. mean/var: the (C,) statistics the
# output was normalised with (batch statistics, biased variance, in training; the running ones in eval).
# Absent optional inputs get empty (0,) gradients from the backward ops.
# ---------------------------------------------------------------------------
DW_FWD_SCHEMA = (
    "(Tensor x, Tensor conv_weight, Tensor? conv_bias, Tensor? bn_weight, Tensor? bn_bias, Tensor? running_mean, "
    "Tensor? running_var, bool training, float eps, bool swish, bool needs_grad) -> (Tensor y, Tensor mean, Tensor var)"
)
DW_BWD_SCHEMA = (
    "(Tensor grad_y, Tensor x, Tensor conv_weight, Tensor? conv_bias, Tensor? bn_weight, Tensor? bn_bias, "
    "Tensor mean, Tensor var, bool training, float eps, bool swish) -> "
    "(Tensor grad_x, Tensor grad_conv_weight, Tensor grad_conv_bias, Tensor grad_bn_weight, Tensor grad_bn_bias)"
)
BN_FWD_SCHEMA = (
    "(Tensor x, Tensor? bn_weight, Tensor? bn_bias, Tensor? running_mean, Tensor? running_var, bool training, "
    "float eps, bool swish, bool needs_grad) -> (Tensor y, Tensor mean, Tensor var)"
)
BN_BWD_SCHEMA = (
    "(Tensor grad_y, Tensor x, Tensor? bn_weight, Tensor? bn_bias, Tensor mean, Tensor var, bool training, "
    "float eps, bool swish) -> (Tensor grad_x, Tensor grad_bn_weight, Tensor grad_bn_bias)"
)
OPS = {
    "dwconv_bn_swish": {"cuda": "dwconv_bn_swish", "triton": "dwconv_bn_swish_triton"},
    "bn_swish": {"cuda": "bn_swish", "triton": "bn_swish_triton"},
}
SCHEMAS = {"dwconv_bn_swish": (DW_FWD_SCHEMA, DW_BWD_SCHEMA), "bn_swish": (BN_FWD_SCHEMA, BN_BWD_SCHEMA)}

for _op, _names in OPS.items():
    for _name in _names.values():
        backends.LIBRARY.define(_name + "_fwd" + SCHEMAS[_op][0])
        backends.LIBRARY.define(_name + "_bwd" + SCHEMAS[_op][1])


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fake_fwd(x, *args):
    stat = x.new_empty((x.shape[1],), dtype=_stat_dtype(x))
    return torch.empty_like(x), stat, torch.empty_like(stat)


def _grad_like(t: Optional[Tensor], x: Tensor) -> Tensor:
    return x.new_empty((0,)) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)


# Both ops share one shape of arguments: fwd (x, *params, running_mean, running_var, training,
# eps, swish, needs_grad) -> (y, mean, var) and bwd (grad_y, x, *params, mean, var, training, eps,
# swish) -> (grad_x, *grad_params), where params are dwconv_bn_swish's (conv_weight, conv_bias,
# bn_weight, bn_bias) or bn_swish's (bn_weight, bn_bias); an absent (None) param gets an empty grad.
def _fake_bwd(grad_y, x, *rest):
    params = rest[:-5]  # rest: *params, mean, var, training, eps, swish
    return (torch.empty_like(x),) + tuple(_grad_like(t, x) for t in params)


def _setup_context(ctx, inputs, output):
    *tensors, _running_mean, _running_var, training, eps, swish, _needs_grad = inputs  # tensors: x, *params
    _, mean, var = output
    ctx.save_for_backward(*tensors, mean, var)
    ctx.training, ctx.eps, ctx.swish = training, eps, swish
    ctx.mark_non_differentiable(mean, var)


def _make_backward(bwd_op):
    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, *params, mean, var = ctx.saved_tensors
        grads = bwd_op(_like_layout(grad_y, x), x, *params, mean, var, ctx.training, ctx.eps, ctx.swish)
        grad_params = tuple(None if t is None else g for t, g in zip(params, grads[1:]))
        return (grads[0],) + grad_params + (None,) * 6  # running_mean .. needs_grad

    return backward


for _names in OPS.values():
    for _name in _names.values():
        backends.register_fwd_bwd(_name, _fake_fwd, _fake_bwd, _make_backward, _setup_context)


# ---------------------------------------------------------------------------
# Argument checks: every bad input gets a ValueError/TypeError naming the argument.
# ---------------------------------------------------------------------------
def _check_tensor(fn: str, name: str, t, x: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} must be a floating tensor ({', '.join(map(str, FLOAT_DTYPES))}), got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but x is on {x.device}; move them to one device")


def _check_channel_vector(fn: str, name: str, t, x: Tensor) -> None:
    if t is None:
        return
    _check_tensor(fn, name, t, x)
    c = x.shape[1]
    if tuple(t.shape) != (c,):
        raise ValueError(f"{fn}: {name} must have shape ({c},) for the {c} channels of x, got {tuple(t.shape)}")


def _check_bn(fn, x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, swish) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: x must be a Tensor, got {type(x).__name__}")
    _check_tensor(fn, "x", x, x)
    if x.dim() != 4:
        raise ValueError(f"{fn}: x must have shape (N, C, H, W), got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _check_channel_vector(fn, name, t, x)
    for name, v in (("training", training), ("swish", swish)):
        if not isinstance(v, bool):
            raise TypeError(f"{fn}: {name} must be a bool, got {type(v).__name__}")
    for name, v in (("momentum", momentum), ("eps", eps)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{fn}: {name} must be a float, got {type(v).__name__}")
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"{fn}: eps must be finite and > 0, got {eps}")
    if not math.isfinite(momentum):
        raise ValueError(f"{fn}: momentum must be finite, got {momentum}")
    if (running_mean is None) != (running_var is None):
        missing = "running_var" if running_var is None else "running_mean"
        raise ValueError(f"{fn}: running_mean and running_var must both be given or both be None; {missing} is None")
    if not training and running_mean is None:
        raise ValueError(f"{fn}: running_mean and running_var are needed when training=False")
    n, _, h, w = x.shape
    if training and n * h * w == 1:
        raise ValueError(f"{fn}: x of shape {tuple(x.shape)} has one value per channel; batch statistics "
                         "(training=True) need more than one")


def _check_conv(fn, x, conv_weight, conv_bias) -> None:
    _check_tensor(fn, "conv_weight", conv_weight, x)
    c = x.shape[1]
    shape = tuple(conv_weight.shape)
    if len(shape) != 4 or shape[0] != c or shape[1] != 1 or shape[2] != shape[3]:
        raise ValueError(f"{fn}: conv_weight must be a depthwise weight of shape ({c}, 1, k, k) for the {c} "
                         f"channels of x, got {shape}")
    if shape[2] % 2 == 0:
        raise ValueError(f"{fn}: conv_weight must have an odd kernel size k (padding k // 2 keeps H, W), "
                         f"got k = {shape[2]}")
    _check_channel_vector(fn, "conv_bias", conv_bias, x)


def _unsupported_k(k: int):
    """Why a backend cannot run the op on x with kernel size k (None when it can)."""
    def unsupported(backend: str, x: Tensor) -> Optional[str]:
        if backend != "torch" and k not in KERNEL_SIZES:
            return f"kernel size {k} (our kernels take {KERNEL_SIZES})"
        if backend != "torch" and x.numel() == 0:
            return "empty input"
        return backends.unsupported(backend, x)

    return unsupported


_unsupported = _unsupported_k(3)  # every dtype on our extension, all but float64 on Triton


def _update_running(running_mean, running_var, mean, var, momentum, count) -> None:
    """nn.BatchNorm2d's update, in place: running = (1 - momentum) * running + momentum * batch stat
    (the variance unbiased), both tensors in one foreach launch."""
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        torch._foreach_lerp_([running_mean, running_var],
                             [mean.to(running_mean.dtype), unbiased.to(running_var.dtype)], momentum)


def _prepare(x: Tensor, *params):
    """x as NCHW-contiguous or channels-last; (C,) parameters contiguous."""
    if not (x.is_contiguous() or is_channels_last(x)):
        x = x.contiguous()
    return (x,) + tuple(None if t is None else t.contiguous() for t in params)


def _needs_grad(*tensors) -> bool:
    """Whether a backward may follow: the fwd ops' performance hint (results do not depend on it)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# GPU "auto", from bench_nvae_cell on an H100 (benchmarks/results/h100-2026-11-27c, training, bf16). Our
# tiled CUDA kernels (NCHW x, k 3 or 5) beat PyTorch's in kernel time at every NVAE shape (forward 1.4-3.5x
# eager, forward+backward 1.9-3.3x) with half of eager's peak memory, but each call also costs ~0.3 ms more
# on the host (more launches and tensor ops), which PyTorch's three kernels hide only on large inputs.
# Wall-clock, ours won forward+backward from 32x384x32x32 (12.6M elements, 1.45x) and forward alone at
# 32x192x64x64 (25.2M, 2.10x), and lost below. So on GPUs auto runs ours from these sizes on, else PyTorch;
# channels-last x (untiled kernels, 0.53x eager on 2026-11-26) and other kernel sizes stay on PyTorch.
_AUTO_GPU_MIN_NUMEL = {True: 1 << 23, False: 1 << 24}  # needs grad -> smallest x.numel() that runs ours
_AUTO_GPU_KS = (3, 5)


def _auto_order(x: Tensor, k: int, needs_grad: bool) -> Optional[tuple]:
    """Backends "auto" tries for dwconv_bn_swish on x: see above for GPUs; the default order elsewhere."""
    if x.device.type != "cuda":
        return None
    ours = k in _AUTO_GPU_KS and x.is_contiguous() and x.numel() >= _AUTO_GPU_MIN_NUMEL[needs_grad]
    return ("cuda", "torch") if ours else ("torch",)


def _describe_auto() -> dict:
    return dict(rule="GPU: cuda (our tiled kernels) for NCHW x with k 3 or 5 and at least "
                     f"{_AUTO_GPU_MIN_NUMEL[True]} elements when a backward may follow "
                     f"({_AUTO_GPU_MIN_NUMEL[False]} for forward only), else torch (cuDNN depthwise conv + "
                     "batch_norm + silu); CPU: cuda (our C++ kernels), then torch. A forced backend runs ours",
                source="benchmarks/results/h100-2026-11-27c (bench_nvae_cell)")


backends.register_auto_rule("dwconv_bn_swish", _describe_auto)


def dwconv_bn_swish(x: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], bn_weight: Optional[Tensor],
                    bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor], *,
                    training: bool, momentum: float = 0.1, eps: float = 1e-5, swish: bool = True) -> Tensor:
    """``swish(batch_norm(depthwise_conv2d(x, conv_weight, conv_bias, padding=k // 2)))`` fused (module doc).

    Arguments as ``F.conv2d`` (groups = C, stride 1) followed by ``F.batch_norm``: in training the
    batch statistics normalise and ``running_mean``/``running_var`` (may be None) are updated in place;
    in eval they normalise. Differentiable in x, conv_weight, conv_bias, bn_weight and bn_bias.
    Returns a tensor with x's shape, dtype and memory layout.
    """
    fn = "dwconv_bn_swish"
    _check_bn(fn, x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, swish)
    _check_conv(fn, x, conv_weight, conv_bias)
    k = conv_weight.shape[-1]
    needs_grad = _needs_grad(x, conv_weight, conv_bias, bn_weight, bn_bias)
    backend = backends.select(fn, x, _unsupported_k(k), auto=_auto_order(x, k, needs_grad))
    if backend == "torch":
        y = dwconv_bn_swish_ref(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
                                training=training, momentum=momentum, eps=eps, swish=swish)
        return _like_layout(y, x) if is_channels_last(x) else y
    x, conv_weight, conv_bias, bn_weight, bn_bias = _prepare(x, conv_weight, conv_bias, bn_weight, bn_bias)
    fwd = getattr(torch.ops.diffusion_fast, OPS[fn][backend] + "_fwd")
    y, mean, var = fwd(x, conv_weight, conv_bias, bn_weight, bn_bias, None if training else running_mean,
                       None if training else running_var, training, float(eps), swish, needs_grad)
    if training and running_mean is not None:
        _update_running(running_mean, running_var, mean, var, float(momentum), x.numel() // x.shape[1])
    return y


def bn_swish(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
             running_var: Optional[Tensor], *, training: bool, momentum: float = 0.1, eps: float = 1e-5,
             swish: bool = True) -> Tensor:
    """``swish(batch_norm(x))`` fused; BatchNorm semantics, arguments and result as ``dwconv_bn_swish``."""
    fn = "bn_swish"
    _check_bn(fn, x, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, swish)
    backend = backends.select(fn, x, _unsupported_k(1))
    if backend == "torch":
        y = bn_swish_ref(x, bn_weight, bn_bias, running_mean, running_var, training=training, momentum=momentum,
                         eps=eps, swish=swish)
        return _like_layout(y, x) if is_channels_last(x) else y
    x, bn_weight, bn_bias = _prepare(x, bn_weight, bn_bias)
    fwd = getattr(torch.ops.diffusion_fast, OPS[fn][backend] + "_fwd")
    y, mean, var = fwd(x, bn_weight, bn_bias, None if training else running_mean, None if training else running_var,
                       training, float(eps), swish, _needs_grad(x, bn_weight, bn_bias))
    if training and running_mean is not None:
        _update_running(running_mean, running_var, mean, var, float(momentum), x.numel() // x.shape[1])
    return y


# The Triton twins run kernels/dwconv_bn_swish.py, imported on first use so that importing
# diffusion_fast never imports triton. CPU tensors reach them only under TRITON_INTERPRET=1.
def _triton(name: str):
    def impl(*args):
        from diffusion_fast.kernels import dwconv_bn_swish as kernels

        return getattr(kernels, name)(*args)

    return impl


for _op, _names in OPS.items():
    for _key in ("CPU", "CUDA"):
        backends.LIBRARY.impl(_names["triton"] + "_fwd", _triton(_op + "_fwd"), _key)
        backends.LIBRARY.impl(_names["triton"] + "_bwd", _triton(_op + "_bwd"), _key)
