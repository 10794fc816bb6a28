"""DDPMUNet: the ε-prediction UNet of Ho et al. 2020 (Appendix B; official ``diffusion_tf/models/unet.py``).

A PixelCNN++-style UNet on Wide-ResNet blocks: ``len(ch_mult)`` resolution levels, each with
``num_res_blocks`` res blocks on the way down and ``num_res_blocks + 1`` (fed the concatenated
skips) on the way up, self-attention at the ``attn_resolutions``, and a sinusoidal timestep
embedding (ch -> 4ch -> 4ch) added inside every res block. Parameter and module names follow
the official code (``temb.dense.0``, ``down.0.block.0.norm1``, ``mid.attn_1``, ``up.3.upsample``,
``norm_out``, ...); ``diffusion_fast.models.convert`` maps them to diffusers' ``UNet2DModel``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_fast.backends import check_optional_name, maybe_use_backend
from diffusion_fast.models.blocks import (AttnBlock, Downsample, ResnetBlock, Upsample, conv2d, linear,
                                          forward_in_layout, timestep_embedding)
from diffusion_fast.nn import FusedGroupNormSiLU

__all__ = ["DDPMUNet"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _Level(nn.Module):
    """One resolution level: res blocks, their attention blocks (if any) and a resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        self.downsample: Optional[Downsample] = None
        self.upsample: Optional[Upsample] = None


class DDPMUNet(nn.Module):
    """ε_θ(x_t, t) of Ho et al. 2020. forward(x: (N, in_channels, H, W) float, t: (N,) or scalar
    timesteps, int or float) -> (N, out_channels, H, W) in x's dtype.

    H and W must be divisible by 2^(len(ch_mult) - 1). Attention sits at the levels whose size
    is in ``attn_resolutions`` when the input is ``resolution`` pixels wide; other input sizes
    run with the same blocks. GroupNorms use ``num_groups`` groups and eps 1e-6 (TensorFlow's
    ``group_norm`` default, which the official code used).

    ``backend`` ("auto", "cuda", "triton", "torch", or None to follow ``diffusion_fast.use_backend``
    and ``DIFFUSION_FAST_BACKEND``) picks the implementation of the fused ops for this model; the
    same weights run on every backend. ``forward(..., backend=...)`` overrides it per call.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        resolution: int = 32,
        dropout: float = 0.0,
        num_groups: int = 32,
        eps: float = 1e-6,
        resamp_with_conv: bool = True,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.config = dict(
            in_channels=in_channels, out_channels=out_channels, ch=ch, ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks, attn_resolutions=tuple(attn_resolutions), resolution=resolution,
            dropout=dropout, num_groups=num_groups, eps=eps, resamp_with_conv=resamp_with_conv,
        )
        self._check_config()
        self.backend = check_optional_name(backend, "DDPMUNet: backend")
        num_levels, temb_ch = len(ch_mult), 4 * ch
        block = dict(dropout=dropout, num_groups=num_groups, eps=eps)

        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([linear(ch, temb_ch), linear(temb_ch, temb_ch)])
        self.conv_in = conv2d(in_channels, ch)

        skip_chs, cur, res = [ch], ch, resolution
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            stage = _Level()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(cur, ch * mult, temb_ch, **block))
                cur = ch * mult
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(cur, num_groups=num_groups, eps=eps))
                skip_chs.append(cur)
            if level != num_levels - 1:
                stage.downsample = Downsample(cur, with_conv=resamp_with_conv)
                skip_chs.append(cur)
                res //= 2
            self.down.append(stage)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cur, cur, temb_ch, **block)
        self.mid.attn_1 = AttnBlock(cur, num_groups=num_groups, eps=eps)
        self.mid.block_2 = ResnetBlock(cur, cur, temb_ch, **block)

        up = []
        for level in reversed(range(num_levels)):
            stage = _Level()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(cur + skip_chs.pop(), ch * ch_mult[level], temb_ch, **block))
                cur = ch * ch_mult[level]
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(cur, num_groups=num_groups, eps=eps))
            if level != 0:
                stage.upsample = Upsample(cur, with_conv=resamp_with_conv)
                res *= 2
            up.insert(0, stage)
        self.up = nn.ModuleList(up)  # indexed by level, like self.down

        self.norm_out = FusedGroupNormSiLU(num_groups, cur, eps)
        self.conv_out = conv2d(cur, out_channels, init_scale=0.0)

    # ------------------------------------------------------------------ configs
    @classmethod
    def cifar10(cls, **overrides) -> "DDPMUNet":
        """CIFAR-10 32x32 (official ``unet2d16b2``): 35,746,307 parameters."""
        return cls(**{**dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                             resolution=32, dropout=0.1), **overrides})

    @classmethod
    def celebahq256(cls, **overrides) -> "DDPMUNet":
        """CelebA-HQ 256x256 (official ``unet2d16b2c112244``, ~114M parameters)."""
        return cls(**{**dict(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,),
                             resolution=256, dropout=0.0), **overrides})

    @classmethod
    def lsun256(cls, **overrides) -> "DDPMUNet":
        """LSUN church/bedroom/cat 256x256: the same network as ``celebahq256``."""
        return cls.celebahq256(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "DDPMUNet":
        """A small network of the same layout for tests and CPU demos (16x16, 0.7M parameters)."""
        return cls(**{**dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16,
                             dropout=0.0), **overrides})

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, t: Union[Tensor, int, float], *, backend: Optional[str] = None) -> Tensor:
        t = self._check_inputs(x, t)
        backend = check_optional_name(backend, "DDPMUNet: forward(backend=)") or self.backend
        with maybe_use_backend(backend):
            return forward_in_layout(self._forward, x, t, cuda_16bit=True)  # measured on an H100

    def _forward(self, x: Tensor, t: Tensor, layout: Optional[torch.memory_format] = None) -> Tensor:
        dense0, dense1 = self.temb.dense
        emb_dtype = torch.float64 if dense0.weight.dtype == torch.float64 else torch.float32
        temb = timestep_embedding(t, self.config["ch"], emb_dtype).to(dense0.weight.dtype)
        temb_act = F.silu(dense1(F.silu(dense0(temb))))  # every res block applies swish to temb first

        # Every later op keeps the layout of conv_in's output (a one-channel x cannot carry it).
        h = self.conv_in(x if layout is None else x.contiguous(memory_format=layout))
        hs = [h if layout is None else h.contiguous(memory_format=layout)]
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(hs[-1], temb_act)
                hs.append(stage.attn[i](h) if len(stage.attn) else h)
            if stage.downsample is not None:
                hs.append(stage.downsample(hs[-1]))

        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb_act)), temb_act)

        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb_act)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if stage.upsample is not None:
                h = stage.upsample(h)
        return self.conv_out(self.norm_out(h))

    # ------------------------------------------------------------------ checks
    def _check_config(self) -> None:
        cfg = self.config
        for name in ("in_channels", "out_channels", "ch", "num_res_blocks", "resolution", "num_groups"):
            value = cfg[name]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"DDPMUNet: {name} must be a positive int, got {value!r}")
        if cfg["ch"] < 4:
            raise ValueError(f"DDPMUNet: ch must be >= 4 (the timestep embedding needs it), got {cfg['ch']}")
        if not cfg["ch_mult"] or any(isinstance(m, bool) or not isinstance(m, int) or m <= 0 for m in cfg["ch_mult"]):
            raise ValueError(f"DDPMUNet: ch_mult must be a non-empty sequence of positive ints, got {cfg['ch_mult']}")
        for width in {cfg["ch"] * m for m in cfg["ch_mult"]}:
            if width % cfg["num_groups"]:
                raise ValueError(f"DDPMUNet: num_groups={cfg['num_groups']} must divide every level's width "
                                 f"ch * ch_mult = {width}")
        if not 0.0 <= cfg["dropout"] < 1.0:
            raise ValueError(f"DDPMUNet: dropout must be in [0, 1), got {cfg['dropout']}")

    def _check_inputs(self, x: Tensor, t) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"DDPMUNet: x must be a Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"DDPMUNet: x must be a floating tensor, got {x.dtype}")
        if x.dtype != self.conv_in.weight.dtype:
            raise TypeError(f"DDPMUNet: x is {x.dtype} but the model's parameters are {self.conv_in.weight.dtype}")
        cin, factor = self.config["in_channels"], 2 ** (len(self.config["ch_mult"]) - 1)
        if x.dim() != 4 or x.shape[1] != cin:
            raise ValueError(f"DDPMUNet: x must have shape (N, {cin}, H, W), got {tuple(x.shape)}")
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"DDPMUNet: x's height and width must be divisible by {factor}, got {tuple(x.shape[2:])}")
        if isinstance(t, bool) or not isinstance(t, (Tensor, int, float)):
            raise TypeError(f"DDPMUNet: t must be a Tensor or a number, got {type(t).__name__}")
        t = torch.as_tensor(t, device=x.device)  # moved to x's device if it is elsewhere
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"DDPMUNet: t must hold integer or real timesteps, got {t.dtype}")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if tuple(t.shape) != (x.shape[0],):
            raise ValueError(f"DDPMUNet: t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
        return t

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items()) + f", backend={self.backend}"
