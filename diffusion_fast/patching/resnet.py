"""Handler for diffusers' ``ResnetBlock2D`` (``diffusers/models/resnet.py``): both GroupNorm→SiLU
pairs run as ``group_norm_silu``, with the time embedding folded into the second one:

    h = conv1(updown(silu(norm1(x))))                       # up/downsample kept where diffusers has it
    e = time_emb_proj(silu(temb))                           # (N, C) or (N, 2C); no silu if skip_time_act
    "default":     h = silu(norm2(h + e))                   # e is the op's pre_bias
    "scale_shift": h = silu(norm2(h) * (1 + s) + t)         # s, t = e.chunk(2, dim=1): scale, shift
    no time_emb_proj:  h = silu(norm2(h))                  # temb None ("default"), or ignored (VAE "group")
    out = (shortcut(updown(x)) + conv2(dropout(h))) / output_scale_factor

Calls the fused forward cannot take (deprecated extra arguments, a ``temb`` that does not
fit ``time_emb_proj``, a batch-broadcast ``temb``) run diffusers' own forward unchanged.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from diffusion_fast.patching.pairs import has_hooks, norm_problem, run_group_norm_silu
from diffusion_fast.patching.report import (
    ATTR,
    Record,
    Replaced,
    Skipped,
    backend_scope,
)

KIND = "resnet_block"


def _fusable_call(block: nn.Module, x: Tensor, temb: Optional[Tensor]) -> bool:
    if block.time_embedding_norm not in ("default", "scale_shift"):
        return True  # e.g. the VAE decoder's "group": no time_emb_proj, temb ignored
    if block.time_emb_proj is None:
        return temb is None and block.time_embedding_norm == "default"
    return temb is not None and temb.dim() == 2 and temb.shape[0] == x.shape[0]


def resnet_block_2d_forward(self, input_tensor: Tensor, temb: Optional[Tensor], *args, **kwargs) -> Tensor:
    """diffusers ``ResnetBlock2D.forward`` with GroupNorm+SiLU fused (module docstring)."""
    if args or kwargs or not _fusable_call(self, input_tensor, temb):
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    with backend_scope(getattr(self, ATTR).backend):
        x = input_tensor
        h = run_group_norm_silu(self.norm1, x)
        if self.upsample is not None:
            if h.shape[0] >= 64:  # as diffusers: upsample_nearest_nhwc fails on large batches
                x, h = x.contiguous(), h.contiguous()
            x, h = self.upsample(x), self.upsample(h)
        elif self.downsample is not None:
            x, h = self.downsample(x), self.downsample(h)
        h = self.conv1(h)
        extras = {}
        if self.time_emb_proj is not None:
            emb = self.time_emb_proj(temb if self.skip_time_act else self.nonlinearity(temb))
            if self.time_embedding_norm == "scale_shift":
                extras["scale"], extras["shift"] = emb.chunk(2, dim=1)
            else:
                extras["pre_bias"] = emb
        h = run_group_norm_silu(self.norm2, h, **extras)
        h = self.conv2(self.dropout(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x.contiguous() if self.training else x)
        return (x + h) / self.output_scale_factor


def _problem(block: nn.Module) -> Optional[str]:
    if "forward" in block.__dict__:
        return "forward is already overridden on the instance (e.g. by accelerate hooks)"
    act = block.nonlinearity
    if not isinstance(act, nn.SiLU) or type(act).forward is not nn.SiLU.forward:
        return f"non_linearity {type(act).__name__} is not SiLU"
    if has_hooks(act):
        return "nonlinearity has hooks that a fused call would skip"
    if block.time_embedding_norm not in ("default", "scale_shift") and block.time_emb_proj is not None:
        return f"time_embedding_norm {block.time_embedding_norm!r} with a time_emb_proj"
    for name in ("norm1", "norm2"):
        problem = norm_problem(getattr(block, name))
        if problem is not None:
            return f"{name}: {problem}"
    return None


def _detail(block: nn.Module) -> str:
    temb = "temb as scale/shift" if block.time_embedding_norm == "scale_shift" else "temb as pre_bias"
    parts = ["norm1+SiLU", "norm2+SiLU fused", temb if block.time_emb_proj is not None else "no temb"]
    parts += ["upsample kept"] if block.upsample is not None else []
    parts += ["downsample kept"] if block.downsample is not None else []
    parts += [f"output_scale_factor={block.output_scale_factor}"] if block.output_scale_factor != 1 else []
    return ", ".join(parts)


def patch_resnet_block_2d(block: nn.Module, path: str, backend: str, report) -> Optional[Record]:
    problem = _problem(block)
    if problem is not None:
        report.skipped.append(Skipped(path, KIND, problem))
        return None
    block.forward = resnet_block_2d_forward.__get__(block)
    report.replaced.append(Replaced(path, KIND, _detail(block)))
    return Record("resnet_block", backend)


def unpatch_resnet_block_2d(block: nn.Module, record: Record) -> None:
    forward = block.__dict__.get("forward")
    if getattr(forward, "__func__", None) is resnet_block_2d_forward:
        del block.__dict__["forward"]
