"""CPU inference convolutions and linears through oneDNN with weights reordered once ("prepacked").

ATen hands oneDNN the plain weight on every call and oneDNN reorders it into its blocked layout
each time (0.6 MB for a 128x128x3x3 conv weight); for small convolution inputs (batch 1, 8x8
maps) ATen skips oneDNN for an im2col + GEMM path, and its linears go to MKL's GEMM, which is
slow at the DDPM attention's sizes. Measured (2-core AVX-512 host, fp32, medians):

    conv 3x3, 1x128x8x8 -> 128      F.conv2d 104 us   prepacked  58 us
    conv 3x3, 1x128x16x16 -> 128    F.conv2d 185 us   prepacked 160 us
    linear 256x128 -> 384 (q,k,v)   F.linear 124 us   prepacked  64 us
    linear 1x256 -> 128 (temb)      F.linear 3.3 us   prepacked  13 us  (hence MIN_ROWS)

Inductor's CPU weight freezing does the same: ``mkldnn_reorder_conv2d_weight`` /
``mkldnn._reorder_linear_weight`` once, then ``mkldnn._convolution_pointwise`` /
``mkldnn._linear_pointwise`` per call. The models' layers use it on the CPU with our backends
(never under ``backend="torch"``, the eager baseline), where no gradient is needed (sampling),
outside torch.compile, in float32 and bfloat16: ``blocks.Conv2d`` on channels_last inputs;
``blocks.Linear``, the DDPM attention block's joint q/k/v and CLIP's in_proj and MLP on inputs of
MIN_ROWS rows or more. The caller keeps the packed weight (``derived_params``).
``DIFFUSION_FAST_ONEDNN=0`` turns it off; if the private oneDNN ops are missing or raise, the
layers go back to ATen and the fallback is reported once (a warning and ``env_info()["fallbacks"]``).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from diffusion_fast import backends
from diffusion_fast.models.param_cache import derived_params

__all__ = ["unsupported_globally", "unsupported", "guarded", "pack_conv2d", "conv2d", "pack_linear", "linear",
           "prepacked_linear", "MIN_ROWS"]

OP = "oneDNN prepacked conv/linear"
MIN_ROWS = 64  # linears on fewer rows stay on ATen (packing pays from a few dozen rows up)
_broken: list = []  # the first failure's reason; from then on every layer takes ATen


def _ops_missing() -> Optional[str]:
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN (mkldnn)"
    needed = [(torch.ops.mkldnn, "_convolution_pointwise"), (torch.ops.mkldnn, "_linear_pointwise"),
              (torch.ops.mkldnn, "_reorder_linear_weight"), (torch._C._nn, "mkldnn_reorder_conv2d_weight")]
    missing = [name for ns, name in needed if not hasattr(ns, name)]
    return f"torch {torch.__version__} lacks {', '.join(missing)}" if missing else None


_MISSING = _ops_missing()


def unsupported_globally() -> Optional[str]:
    """Why no layer can take oneDNN at all (None: they can, input permitting)."""
    if os.environ.get("DIFFUSION_FAST_ONEDNN", "1") == "0":
        return "DIFFUSION_FAST_ONEDNN=0"
    return _MISSING or (_broken[0] if _broken else None)


backends.register_auto_rule("conv2d/linear (models, CPU sampling)", lambda: {
    "rule": "oneDNN with prepacked weights on CPU inputs without autograd (convs: channels_last; linears: "
            f">= {MIN_ROWS} rows), else ATen",
    "onednn": unsupported_globally() is None, "why_not": unsupported_globally()})


def unsupported(x: Tensor, *params: Optional[Tensor]) -> Optional[str]:
    """Why a layer with ``params`` (weight first) takes ATen on input x, or None if oneDNN runs it."""
    if torch.compiler.is_compiling():
        return "inside torch.compile (Inductor does its own)"
    why = unsupported_globally()
    if why is not None:
        return why
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or params[0].dtype != x.dtype:
        return "not a float32/bfloat16 CPU input of the weight's dtype"
    if torch.is_grad_enabled() and (x.requires_grad or any(p is not None and p.requires_grad for p in params)):
        return "gradient needed"
    if backends.current() == "torch":
        return "backend torch (the eager baseline)"
    return None


def guarded(run: Callable[[], Tensor]) -> Optional[Tensor]:
    """``run()``, or None if oneDNN raised: reported once, then ATen for every layer."""
    try:
        return run()
    except RuntimeError as e:  # a torch whose private oneDNN ops changed
        _broken.append(f"oneDNN failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        backends._note_fallback(OP, "onednn", _broken[0], "aten")
        return None


def pack_conv2d(conv: nn.Conv2d, input_shape: tuple) -> Tensor:
    """conv's (O, I/groups, kh, kw) weight in the blocked layout oneDNN picks for this input
    shape: an opaque MKLDNN tensor."""
    return torch._C._nn.mkldnn_reorder_conv2d_weight(
        conv.weight.detach().to_mkldnn(), list(conv.padding), list(conv.stride), list(conv.dilation),
        conv.groups, list(input_shape))


def conv2d(conv: nn.Conv2d, x: Tensor, packed: Tensor) -> Tensor:
    """conv(x): (N, C, H, W) channels_last -> (N, O, H', W') channels_last; zero padding only."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, packed, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
        "none", [], "")


def pack_linear(weight: Tensor, rows: int) -> Tensor:
    """A (out, in) weight in oneDNN's layout for GEMMs of ``rows`` input rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


def linear(x: Tensor, packed: Tensor, bias: Optional[Tensor], act: str = "none", algorithm: str = "") -> Tensor:
    """act(x (..., in) @ weightᵀ + bias) -> (..., out), contiguous; act "none", "swish" (x·σ(x)) or
    "gelu" (algorithm "none": erf, "tanh") runs in the GEMM's epilogue."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, act, [], algorithm)


def prepacked_linear(module: nn.Module, name: str, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                     sources: Optional[tuple] = None, act: str = "none") -> Tensor:
    """act(F.linear(x, weight, bias)), act "none" or "swish": x (..., in) -> (..., out). On oneDNN where
    ``unsupported`` allows and x has at least MIN_ROWS rows (act in the GEMM's epilogue), with ``weight``
    packed once and kept for ``module`` under ``name`` until ``sources`` (the parameters weight is made
    from; default: weight itself) change."""
    if act not in ("none", "swish"):
        raise ValueError(f"prepacked_linear: act must be 'none' or 'swish', got {act!r}")
    rows = x.numel() // max(x.shape[-1], 1)
    if rows >= MIN_ROWS and unsupported(x, weight, bias) is None:
        y = guarded(lambda: linear(x, derived_params(module, name, sources or (weight,),
                                                     lambda *_: pack_linear(weight, rows), extra=(rows,)), bias, act))
        if y is not None:
            return y
    y = torch.nn.functional.linear(x, weight, bias)
    return torch.nn.functional.silu(y) if act == "swish" else y
