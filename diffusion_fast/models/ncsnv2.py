"""NCSNv2: the noise-conditional score network of Song & Ermon 2020, "Improved Techniques for
Training Score-Based Generative Models" (Sec. 3-4, Appendix B; official ermongroup/ncsnv2
``models/ncsnv2.py`` ``NCSNv2`` and ``models/layers.py``).

A RefineNet: ``begin_conv`` (3x3, C -> ngf), four stages of two pre-activation residual blocks
(InstanceNorm++ -> ELU -> conv, twice), then four RefineBlocks back up and
``end_conv(ELU(InstanceNorm++(·)))``:

    stage   channels      resolution   convs
    res1    ngf           H            3x3
    res2    2 ngf         H/2          3x3, the first block mean-pools (ConvMeanPool)
    res3    2 ngf         H/2          3x3 dilation 2 (no pooling: dilation replaces it)
    res4    2 ngf         H/2          3x3 dilation 4
    refine1 [res4] -> 2 ngf; refine2 [res3, ref1] -> 2 ngf; refine3 [res2, ref2] -> ngf;
    refine4 [res1, ref3] -> ngf (end block)

Noise conditioning is by rescaling (Technique 3): the network sees no label; its output is
divided by σ_labels, ``s(x, i) = f(x) / σ_i``. The model holds the geometric σ table as the
buffer ``sigmas`` and takes ``model(x, labels)`` with labels: (N,) int64 indices into it.

Module and parameter names are the official ones (``res2.0.conv2.conv``, ``refine4.output_convs.3_2_conv``,
``normalizer.alpha``, ``sigmas``), so an official checkpoint's ``state_dict`` loads with
``load_state_dict`` (``official_state_dict`` strips DataParallel's ``module.`` prefix).
Every InstanceNorm++ runs through the fused ``group_norm_silu`` op (see
``diffusion_fast.nn.instance_norm_plus``); the ``backend=`` switch picks its implementation.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_fast.backends import check_optional_name, maybe_use_backend
from diffusion_fast.models.blocks import Conv2d, forward_in_layout
from diffusion_fast.models.refinenet import RefineBlock, conv3x3
from diffusion_fast.nn import InstanceNorm2dPlus

__all__ = ["NCSNv2", "ResidualBlock", "ConvMeanPool", "ncsn_sigmas", "official_state_dict", "ACTIVATIONS"]

# The official ``get_act`` choices; "swish" is fused into the InstanceNorm++ kernel.
ACTIVATIONS = {
    "elu": F.elu,
    "relu": F.relu,
    "lrelu": lambda x: F.leaky_relu(x, 0.2),
    "swish": F.silu,
}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def ncsn_sigmas(sigma_begin: float, sigma_end: float, num_classes: int) -> Tensor:
    """The official geometric noise levels σ_i = exp(linspace(log σ_1, log σ_L, L)): (L,) float32,
    computed in float64 like the official ``get_sigmas``."""
    return torch.exp(torch.linspace(math.log(sigma_begin), math.log(sigma_end), num_classes,
                                    dtype=torch.float64)).float()


def _norm_act(norm: InstanceNorm2dPlus, x: Tensor, act: str) -> Tensor:
    """act(InstanceNorm++(x)) with SiLU fused into the norm's kernel when act is "swish"."""
    if act == "swish":
        return norm(x, silu=True)
    return ACTIVATIONS[act](norm(x))


class ConvMeanPool(nn.Module):
    """Convolution (size-preserving padding) then 2x2 mean pooling. forward((N, C, H, W), H and W
    even) -> (N, out, H/2, W/2). The official ``adjust_padding`` variant is not needed: NCSNv2's
    only such block is dilated, and the official code ignores the flag there."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3) -> None:
        super().__init__()
        self.conv = Conv2d(in_ch, out_ch, kernel, padding=kernel // 2)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv(x), 2)


class ResidualBlock(nn.Module):
    """Pre-activation residual block (official ``ResidualBlock``)::

        h = conv2(act(normalize2(conv1(act(normalize1(x))))))
        return shortcut(x) + h

    - ``resample=None``: conv1 in -> out, conv2 out -> out; shortcut = 1x1 conv (3x3 dilated conv
      when ``dilation``) only if in != out.
    - ``resample="down"`` without dilation: conv1 in -> in, conv2 = ConvMeanPool(in -> out, 3x3),
      shortcut = ConvMeanPool(1x1); halves H and W.
    - ``resample="down"`` with ``dilation``: as above but all convs 3x3 dilated, no pooling, and the
      shortcut a dilated 3x3 conv.

    forward(x: (N, in, H, W)) -> (N, out, H', W').
    """

    def __init__(self, in_ch: int, out_ch: int, act: str, *, resample: Optional[str] = None,
                 dilation: Optional[int] = None) -> None:
        super().__init__()
        if resample not in (None, "down"):
            raise ValueError(f"ResidualBlock: resample must be None or 'down', got {resample!r}")
        self.act, self.resample = act, resample
        mid = in_ch if resample == "down" else out_ch
        conv = (lambda i, o: conv3x3(i, o)) if dilation is None else (lambda i, o: conv3x3(i, o, dilation=dilation))
        self.normalize1 = InstanceNorm2dPlus(in_ch)
        self.conv1 = conv(in_ch, mid)
        self.normalize2 = InstanceNorm2dPlus(mid)
        if resample == "down" and dilation is None:
            self.conv2 = ConvMeanPool(mid, out_ch, 3)
            self.shortcut = ConvMeanPool(in_ch, out_ch, 1)
        else:
            self.conv2 = conv(mid, out_ch)
            if resample is not None or in_ch != out_ch:
                self.shortcut = conv(in_ch, out_ch) if dilation is not None else Conv2d(in_ch, out_ch, 1)
            else:
                self.shortcut = None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(_norm_act(self.normalize1, x, self.act))
        h = self.conv2(_norm_act(self.normalize2, h, self.act))
        return (x if self.shortcut is None else self.shortcut(x)) + h


class NCSNv2(nn.Module):
    """s_θ(x, i) of NCSNv2 (module doc). forward(x: (N, channels, H, W) float, labels: (N,) int64
    noise-level indices or one int) -> (N, channels, H, W) in x's dtype, the score at σ_labels.

    H and W must be even. With ``rescaled=False`` (the official CIFAR-10 setting) inputs are
    images in [0, 1] and the network first maps them to 2x - 1; ``rescaled=True`` takes data as is.
    ``dilations`` are those of res3 and res4 (official (2, 4)); ``nonlinearity`` is one of
    ``ACTIVATIONS`` (official "elu"). ``backend`` ("auto", "cuda", "triton", "torch", or None to
    follow ``diffusion_fast.use_backend``) picks the InstanceNorm++ implementation;
    ``forward(..., backend=)`` overrides it per call.
    """

    def __init__(self, *, channels: int = 3, ngf: int = 128, num_classes: int = 232, sigma_begin: float = 50.0,
                 sigma_end: float = 0.01, nonlinearity: str = "elu", dilations: Sequence[int] = (2, 4),
                 rescaled: bool = False, backend: Optional[str] = None) -> None:
        super().__init__()
        self.config = dict(channels=channels, ngf=ngf, num_classes=num_classes, sigma_begin=sigma_begin,
                           sigma_end=sigma_end, nonlinearity=nonlinearity, dilations=tuple(dilations),
                           rescaled=rescaled)
        self._check_config()
        self.backend = check_optional_name(backend, "NCSNv2: backend")
        self.act = act = nonlinearity
        d3, d4 = dilations
        self.register_buffer("sigmas", ncsn_sigmas(sigma_begin, sigma_end, num_classes))

        self.begin_conv = Conv2d(channels, ngf, 3, padding=1)
        self.res1 = nn.ModuleList([ResidualBlock(ngf, ngf, act), ResidualBlock(ngf, ngf, act)])
        self.res2 = nn.ModuleList([ResidualBlock(ngf, 2 * ngf, act, resample="down"),
                                   ResidualBlock(2 * ngf, 2 * ngf, act)])
        self.res3 = nn.ModuleList([ResidualBlock(2 * ngf, 2 * ngf, act, resample="down", dilation=d3),
                                   ResidualBlock(2 * ngf, 2 * ngf, act, dilation=d3)])
        self.res4 = nn.ModuleList([ResidualBlock(2 * ngf, 2 * ngf, act, resample="down", dilation=d4),
                                   ResidualBlock(2 * ngf, 2 * ngf, act, dilation=d4)])
        fn = ACTIVATIONS[act]
        self.refine1 = RefineBlock([2 * ngf], 2 * ngf, fn, start=True)
        self.refine2 = RefineBlock([2 * ngf, 2 * ngf], 2 * ngf, fn)
        self.refine3 = RefineBlock([2 * ngf, 2 * ngf], ngf, fn)
        self.refine4 = RefineBlock([ngf, ngf], ngf, fn, end=True)
        self.normalizer = InstanceNorm2dPlus(ngf)
        self.end_conv = Conv2d(ngf, channels, 3, padding=1)

    # ------------------------------------------------------------------ configs
    @classmethod
    def cifar10(cls, **overrides) -> "NCSNv2":
        """CIFAR-10 32x32 (official ``configs/cifar10.yml``): ngf 128, L = 232 geometric σ from 50
        to 0.01, ELU, InstanceNorm++; sampled with n_steps_each 5, step_lr 6.2e-6 (``SAMPLING``)."""
        return cls(**{**dict(channels=3, ngf=128, num_classes=232, sigma_begin=50.0, sigma_end=0.01), **overrides})

    @classmethod
    def digits8(cls, **overrides) -> "NCSNv2":
        """A CPU-sized config for scikit-learn's 8x8 digits (1 channel, data in [0, 1]): ngf 16,
        L = 10 σ from 1 to 0.01, dilations (1, 2) to suit the 4x4 inner maps."""
        return cls(**{**dict(channels=1, ngf=16, num_classes=10, sigma_begin=1.0, sigma_end=0.01,
                             dilations=(1, 2)), **overrides})

    SAMPLING = {"cifar10": dict(n_steps_each=5, step_lr=6.2e-6, denoise=True)}

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, labels: Union[Tensor, int], *, backend: Optional[str] = None) -> Tensor:
        labels = self._check_inputs(x, labels)
        backend = check_optional_name(backend, "NCSNv2: forward(backend=)") or self.backend
        with maybe_use_backend(backend):
            return forward_in_layout(self._forward, x, labels)

    def _forward(self, x: Tensor, labels: Tensor, layout: Optional[torch.memory_format] = None) -> Tensor:
        h = x if self.config["rescaled"] else 2 * x - 1.0
        h = self.begin_conv(h)  # every later op keeps its output's layout (x's few channels cannot carry it)
        h = h if layout is None else h.contiguous(memory_format=layout)
        layers = []
        for stage in (self.res1, self.res2, self.res3, self.res4):
            for block in stage:
                h = block(h)
            layers.append(h)
        l1, l2, l3, l4 = layers
        h = self.refine1([l4], l4.shape[2:])
        h = self.refine2([l3, h], l3.shape[2:])
        h = self.refine3([l2, h], l2.shape[2:])
        h = self.refine4([l1, h], l1.shape[2:])
        h = self.end_conv(_norm_act(self.normalizer, h, self.act))
        return h / self.sigmas[labels].to(h.dtype).reshape(-1, 1, 1, 1)

    # ------------------------------------------------------------------ checks
    def _check_config(self) -> None:
        cfg = self.config
        for name in ("channels", "ngf", "num_classes"):
            value = cfg[name]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"NCSNv2: {name} must be a positive int, got {value!r}")
        if cfg["ngf"] < 2:
            raise ValueError(f"NCSNv2: ngf must be >= 2 (InstanceNorm++ needs 2 channels), got {cfg['ngf']}")
        if not (0 < cfg["sigma_end"] and 0 < cfg["sigma_begin"]):
            raise ValueError(f"NCSNv2: sigma_begin and sigma_end must be > 0, got {cfg['sigma_begin']}, "
                             f"{cfg['sigma_end']}")
        if cfg["nonlinearity"] not in ACTIVATIONS:
            raise ValueError(f"NCSNv2: nonlinearity must be one of {tuple(ACTIVATIONS)}, got {cfg['nonlinearity']!r}")
        if len(cfg["dilations"]) != 2 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1
                                             for d in cfg["dilations"]):
            raise ValueError(f"NCSNv2: dilations must be two positive ints, got {cfg['dilations']}")

    def _check_inputs(self, x: Tensor, labels) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"NCSNv2: x must be a Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"NCSNv2: x must be a floating tensor, got {x.dtype}")
        if x.dtype != self.begin_conv.weight.dtype:
            raise TypeError(f"NCSNv2: x is {x.dtype} but the model's parameters are {self.begin_conv.weight.dtype}")
        c = self.config["channels"]
        if x.dim() != 4 or x.shape[1] != c:
            raise ValueError(f"NCSNv2: x must have shape (N, {c}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"NCSNv2: x's height and width must be even, got {tuple(x.shape[2:])}")
        if isinstance(labels, bool) or not isinstance(labels, (Tensor, int)):
            raise TypeError(f"NCSNv2: labels must be an int64 Tensor or an int, got {type(labels).__name__}")
        if isinstance(labels, int):
            if not 0 <= labels < self.config["num_classes"]:
                raise ValueError(f"NCSNv2: labels must be in [0, {self.config['num_classes']}), got {labels}")
            return torch.full((x.shape[0],), labels, dtype=torch.long, device=x.device)
        if labels.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"NCSNv2: labels must hold integer noise-level indices, got {labels.dtype}")
        if tuple(labels.shape) != (x.shape[0],):
            raise ValueError(f"NCSNv2: labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
        return labels.to(x.device)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items()) + f", backend={self.backend}"


def official_state_dict(checkpoint: Union[Mapping, Sequence], *, ema: bool = False) -> dict:
    """The NCSNv2 ``state_dict`` inside an official checkpoint, ready for ``NCSNv2.load_state_dict``.

    ``checkpoint``: ``torch.load`` of the official ``checkpoint.pth`` (a list ``[score, optimizer,
    epoch, step, ema]``, the score's keys prefixed ``module.`` by DataParallel) or a bare state
    dict. ``ema=True`` takes the parameters from the EMA helper's shadow (``checkpoint[4]``, which
    holds parameters only) and the ``sigmas`` buffer from the score's state dict.
    """
    def strip(sd) -> dict:
        if not isinstance(sd, Mapping):
            raise TypeError(f"official_state_dict: expected a state dict, got {type(sd).__name__}")
        return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}

    if not isinstance(checkpoint, (list, tuple)):
        if ema:
            raise ValueError("official_state_dict: ema=True needs the full checkpoint list, got a bare state dict")
        return strip(checkpoint)
    if ema and len(checkpoint) < 5:
        raise ValueError(f"official_state_dict: ema=True but the checkpoint has no EMA state ({len(checkpoint)} items)")
    state = strip(checkpoint[0])
    if ema:
        state.update(strip(checkpoint[4]))
    return state
