"""Building blocks of the DDPM UNet (Ho et al. 2020, Appendix B; official ``diffusion_tf/models/unet.py``).

Tensors are NCHW. Every GroupNorm followed by swish is one ``FusedGroupNormSiLU`` call, and
the res block's time-embedding add ``h + temb_proj(swish(temb))`` is that call's ``pre_bias``.
Attention goes through ``diffusion_fast.models.attention.attention``.

Initialisation follows the official code: weights ``variance_scaling(scale, "fan_avg",
"uniform")`` (Xavier-uniform for scale 1), biases 0, and the layers it creates with
``init_scale=0`` (each res block's last conv, the attention output projection, the
UNet's last conv) get scale 1e-10, i.e. they start at (almost exactly) zero.
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_fast import backends
from diffusion_fast.models import onednn
from diffusion_fast.models.attention import attention
from diffusion_fast.models.param_cache import derived_params
from diffusion_fast.nn import FusedGroupNormSiLU

__all__ = ["timestep_embedding", "conv2d", "linear", "run_channels_last", "forward_in_layout", "Conv2d", "Linear",
           "ResnetBlock", "AttnBlock", "Downsample", "Upsample"]


def timestep_embedding(t: Tensor, dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017, Sec. 3.5).

    t: (N,) any real dtype. Returns (N, dim), computed in ``dtype`` (float32, as the official
    code and diffusers do; float64 for float64 models):
    ``[sin(t w_0), ..., sin(t w_{h-1}), cos(t w_0), ..., cos(t w_{h-1})]`` with h = dim // 2 and
    ``w_k = 10000^(-k / (h - 1))``, zero-padded by one column when dim is odd. Same as the
    official ``nn.get_timestep_embedding`` and diffusers' ``Timesteps(dim, flip_sin_to_cos=False,
    downscale_freq_shift=1)``.
    """
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=dtype, device=t.device) / (half - 1)
    args = t.to(dtype)[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 == 1 else emb


LAYOUT_ENV_VAR = "DIFFUSION_FAST_CHANNELS_LAST"  # "1" / "0": force channels_last / NCHW; unset: the rule below


def run_channels_last(x: Tensor, cuda_16bit: bool = False) -> bool:
    """Whether a model's forward on our kernels runs in channels_last (NHWC) memory.

    On the CPU, always: oneDNN convolutions then need no reorder of the activations into blocked layouts and back
    around every call, our GroupNorm's NHWC kernel is 1.3-4x faster than its NCHW one at 4x4-8x8 maps, and ATen's
    5x5 stride-1 max pool (NCSNv2's residual pooling) is ~9x faster than its NCHW kernel, which keeps an argmax
    per output (measured, fp32; NCSNv2 sampling: 2.6 -> 1.3 s). On a GPU, for fp16/bf16 x of the models that pass
    ``cuda_16bit`` (measured there): cuDNN's 16-bit convolutions take NHWC natively, and NCHW costs a transpose
    around each (H100, DDPMUNet CIFAR-10 bf16 forward, summed kernel time: 9.2 -> 7.2 ms at batch 128,
    1.7 -> 1.4 ms at batch 1); other GPU cases keep NCHW until measured. ``DIFFUSION_FAST_CHANNELS_LAST`` = 1 or
    0 overrides the rule (read at each call). The reference backend keeps the plain NCHW model, so
    ``backend="torch"`` stays the eager baseline.
    """
    if backends.current() == "torch":
        return False
    forced = os.environ.get(LAYOUT_ENV_VAR, "")
    if forced not in ("", "0", "1"):
        raise ValueError(f"{LAYOUT_ENV_VAR} must be 1 (channels_last), 0 (NCHW) or unset (automatic), got {forced!r}")
    if forced:
        return forced == "1"
    if x.device.type == "cpu":
        return True
    return cuda_16bit and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


def forward_in_layout(forward: Callable[..., Tensor], x: Tensor, *args, cuda_16bit: bool = False) -> Tensor:
    """``forward(x, *args, layout)`` with layout channels_last where ``run_channels_last(x, cuda_16bit)`` says so
    (else None: x's own layout); the result comes back in x's layout."""
    layout = torch.channels_last if run_channels_last(x, cuda_16bit) else None
    y = forward(x, *args, layout)
    return y.contiguous() if layout is not None and not x.is_contiguous(memory_format=layout) else y


def _channels_last_4d(x: Tensor) -> bool:
    """x is a batched (N, C, H, W) tensor stored channels_last (and not also NCHW-contiguous)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state-dict keys) that, on a channels_last input,
    convolves with a channels_last copy of its weight, kept between sampling calls by
    ``derived_params``. Given an NCHW weight, oneDNN and ATen's CPU convolution copy it into
    channels_last on every call (DDPMUNet runs channels_last on the CPU): ~10% of a batch-1
    forward of the small CPU config, all weights copied once per call.
    """

    def takes_onednn(self, x: Tensor) -> bool:
        """Whether this conv runs x through oneDNN with a packed weight (``onednn.unsupported``)."""
        return _channels_last_4d(x) and self._onednn_fits(x)

    def _onednn_fits(self, x: Tensor) -> bool:
        return (self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and onednn.unsupported(x, self.weight, self.bias) is None)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if _channels_last_4d(x):
            if self._onednn_fits(x):
                y = onednn.guarded(lambda: onednn.conv2d(self, x, derived_params(
                    self, "_onednn_weight", (self.weight,), lambda w: onednn.pack_conv2d(self, x.shape),
                    extra=tuple(x.shape))))
                if y is not None:
                    return y
            weight = derived_params(self, "_channels_last_weight", (weight,),
                                    lambda w: w.contiguous(memory_format=torch.channels_last))
        return self._conv_forward(x, weight, self.bias)


def _variance_scaling_(layer: nn.Module, scale: float) -> nn.Module:
    """Official ``default_init``: uniform(±sqrt(3 scale / fan_avg)), scale 0 → 1e-10; bias 0."""
    scale = 1e-10 if scale == 0 else scale
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(layer.weight)
    limit = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2.0))
    with torch.no_grad():
        layer.weight.uniform_(-limit, limit)
        layer.bias.zero_()
    return layer


def conv2d(in_ch: int, out_ch: int, kernel: int = 3, *, stride: int = 1, padding: Optional[int] = None,
           init_scale: float = 1.0) -> Conv2d:
    """``Conv2d`` with the official initialisation; padding defaults to kernel // 2 ("SAME", stride 1)."""
    pad = kernel // 2 if padding is None else padding
    return _variance_scaling_(Conv2d(in_ch, out_ch, kernel, stride=stride, padding=pad), init_scale)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) that runs through oneDNN with a
    prepacked weight (``onednn``) when sampling on the CPU with our backends, from
    ``onednn.MIN_ROWS`` input rows up (the attention projections here, CLIP's MLP and projections)."""

    def forward(self, x: Tensor) -> Tensor:
        return onednn.prepacked_linear(self, "_onednn_weight", x, self.weight, self.bias)


def linear(in_features: int, out_features: int, *, init_scale: float = 1.0) -> Linear:
    """Linear layer (the official ``dense`` / ``nin``) with the official initialisation."""
    return _variance_scaling_(Linear(in_features, out_features), init_scale)


class ResnetBlock(nn.Module):
    """Wide-ResNet block with a time-embedding bias (official ``resnet_block``).

        h = conv1(swish(GN1(x)))                                  # conv 3x3, in_ch -> out_ch
        h = conv2(dropout(swish(GN2(h + temb_proj(swish(temb))))))  # conv 3x3, init ~0
        return shortcut(x) + h                                    # 1x1 conv (nin_shortcut) iff in_ch != out_ch

    forward(x: (N, in_ch, H, W), temb_act: (N, temb_ch) = swish(temb), computed once per
    UNet call) -> (N, out_ch, H, W), x's dtype.
    """

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, *, dropout: float = 0.0, num_groups: int = 32,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = FusedGroupNormSiLU(num_groups, in_ch, eps)
        self.conv1 = conv2d(in_ch, out_ch)
        self.temb_proj = linear(temb_ch, out_ch)
        self.norm2 = FusedGroupNormSiLU(num_groups, out_ch, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv2d(out_ch, out_ch, init_scale=0.0)
        self.nin_shortcut = conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor, temb_act: Tensor) -> Tensor:
        h = self.conv1(self.norm1(x))
        h = self.norm2(h, pre_bias=self.temb_proj(temb_act))
        h = self.conv2(self.dropout(h))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (official ``attn_block``).

        h = GN(x)                              # no swish
        q, k, v = h Wq, h Wk, h Wv             # 1x1 ("nin"), C -> C, per position
        return x + proj_out(softmax(q kᵀ / sqrt(C)) v)   # proj_out 1x1, init ~0

    The torch backend runs it as written; our backends make q, k, v one C -> 3C GEMM and, on
    NCHW x, fold the residual add into the output GEMM (measured on the 2-core CPU, fp32, one
    thread: 0.85x the time at (8, 128, 16, 16), 0.91x at (32, 64, 8, 8), equal at batch 1).

    forward(x: (N, C, H, W)) -> (N, C, H, W), x's dtype.
    """

    def __init__(self, ch: int, *, num_groups: int = 32, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = FusedGroupNormSiLU(num_groups, ch, eps, silu=False)
        self.q = linear(ch, ch)
        self.k = linear(ch, ch)
        self.v = linear(ch, ch)
        self.proj_out = linear(ch, ch, init_scale=0.0)

    def forward(self, x: Tensor) -> Tensor:
        if x.is_contiguous(memory_format=torch.channels_last):
            return self._forward_tokens(x)
        if backends.current() != "torch":
            return self._forward_fused(x)
        n, c, hgt, wid = x.shape  # the reference: three projections, as the official code
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (N, HW, C)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.q, self.k, self.v))  # (N, 1, HW, C)
        h = self.proj_out(attention(q, k, v).squeeze(1))
        return x + h.transpose(1, 2).reshape(n, c, hgt, wid)

    def _qkv(self, tokens: Tensor) -> tuple:
        """q, k, v: (N, 1, HW, C) views of one (C -> 3C) projection of tokens (N, 1, HW, C)."""
        weight, bias = self._qkv_params()  # packed from q/k/v's own weights, not from the cat (whose address is reused)
        qkv = onednn.prepacked_linear(self, "_qkv_onednn", tokens, weight, bias,
                                      sources=(self.q.weight, self.k.weight, self.v.weight))
        return qkv.chunk(3, dim=-1)  # row stride 3C

    def _qkv_params(self) -> tuple:
        """The (3C, C) weight and (3C,) bias of the joint projection, concatenated once per
        change of the parameters when sampling (``derived_params``)."""
        params = (self.q.weight, self.k.weight, self.v.weight, self.q.bias, self.k.bias, self.v.bias)
        return derived_params(self, "_qkv_cache", params, lambda *p: (torch.cat(p[:3]), torch.cat(p[3:])))

    def _forward_tokens(self, x: Tensor) -> Tensor:
        """x channels_last: its memory already is the (N, HW, C) token matrix, so nothing is transposed."""
        n, c, hgt, wid = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(n, 1, hgt * wid, c)  # a view
        h = self.proj_out(attention(*self._qkv(tokens))).reshape(n, hgt, wid, c).permute(0, 3, 1, 2)
        return x + h

    def _forward_fused(self, x: Tensor) -> Tensor:
        """x NCHW: one q/k/v GEMM, and the residual add as the output GEMM's accumulator
        (x + W_p oᵀ in one baddbmm), instead of four GEMMs and a separate add."""
        n, c, hgt, wid = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2).unsqueeze(1)  # (N, 1, HW, C) view
        o = attention(*self._qkv(tokens)).squeeze(1)  # (N, HW, C)
        out = torch.baddbmm(x.flatten(2), self.proj_out.weight.expand(n, c, c), o.transpose(1, 2))
        return out.add_(self.proj_out.bias[:, None]).view(n, c, hgt, wid)


class Downsample(nn.Module):
    """Halve H and W: conv 3x3 stride 2 with TensorFlow "SAME" padding (one zero row/column
    after, none before, for even sizes), or 2x2 average pooling when ``with_conv=False``.

    forward(x: (N, C, H, W), H and W even) -> (N, C, H/2, W/2).
    """

    def __init__(self, ch: int, *, with_conv: bool = True) -> None:
        super().__init__()
        self.conv = conv2d(ch, ch, 3, stride=2, padding=0) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2, 2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


# Nearest 2x upsampling then a 3x3 conv (padding 1): output row 2i + a reads upsampled rows 2i + a - 1 .. 2i + a + 1,
# which are x rows i - 1, i, i (a = 0) or i, i, i + 1 (a = 1). _PHASE_TAPS[a] maps the 3 kernel rows onto the 2 x
# rows i - 1 + a, i + a it touches; columns alike.
_PHASE_TAPS = (((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))


def _phase_conv(conv: nn.Conv2d) -> SimpleNamespace:
    """conv3x3(up2(x)) as one 2x2 conv of x (padding 1): output channel block 2a + b holds the phase y[2i+a, 2j+b]
    at (i + a, j + b); kernel K_ab = T_a W T_bᵀ per (out, in) channel pair, computed in fp32."""
    w = conv.weight.detach().float()
    taps = torch.tensor(_PHASE_TAPS, device=w.device)
    k = torch.cat([torch.einsum("up,ocpq,vq->ocuv", taps[a], w, taps[b]) for a in (0, 1) for b in (0, 1)])
    return SimpleNamespace(weight=k.to(conv.weight.dtype), bias=conv.bias.detach().repeat(4), padding=(1, 1),
                           stride=(1, 1), dilation=(1, 1), groups=1)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then conv 3x3 when ``with_conv``.

    When the conv may run on oneDNN with a packed weight (CPU sampling, channels_last x: ``onednn``), the
    upsampling is folded into it: each of the four output phases (row and column parity) is a 2x2 conv of x
    (``_phase_conv``), all four in one oneDNN call, then interleaved: 4 multiply-adds per output and input
    channel instead of 9, and no upsampled copy of x (8x128x16x16 fp32 on a 2-core Zen 5: 5.2 -> 2.8 ms).

    forward(x: (N, C, H, W)) -> (N, C, 2H, 2W).
    """

    def __init__(self, ch: int, *, with_conv: bool = True) -> None:
        super().__init__()
        self.conv = conv2d(ch, ch) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is not None and self.conv.takes_onednn(x):
            y = onednn.guarded(lambda: self._forward_phases(x))
            if y is not None:
                return y
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)

    def _forward_phases(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) channels_last -> (N, O, 2H, 2W) channels_last, through ``_phase_conv``."""
        n, _, h, w = x.shape
        conv, packed = derived_params(self, "_phase_conv", (self.conv.weight, self.conv.bias), lambda *_: (
            (m := _phase_conv(self.conv)), onednn.pack_conv2d(m, x.shape)), extra=tuple(x.shape))
        out = onednn.conv2d(conv, x, packed)  # (N, 4 O, H + 1, W + 1)
        phases = out.permute(0, 2, 3, 1).reshape(n, h + 1, w + 1, 2, 2, -1)  # a view when out is channels_last
        y = out.new_empty(n, h, 2, w, 2, phases.shape[-1])
        for a in (0, 1):
            for b in (0, 1):
                y[:, :, a, :, b] = phases[:, a:a + h, b:b + w, a, b]
        return y.view(n, 2 * h, 2 * w, -1).permute(0, 3, 1, 2)
