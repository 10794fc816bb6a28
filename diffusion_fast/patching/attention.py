"""Handler for diffusers' ``Attention``: a processor that runs ``diffusion_fast.models.attention``.

``DiffusionFastAttnProcessor`` is called like diffusers' ``AttnProcessor2_0`` and computes the
same thing (``diffusers/models/attention_processor.py``), for B x L tokens of C channels:

    h = group_norm(x)                        # if attn.group_norm; our op with silu=False
    q, k, v = to_q(h), to_k(ctx), to_v(ctx)  # ctx = encoder_hidden_states, or h (self-attention)
    o = attention(q, k, v)                   # (B, heads, L, d), softmax(q kᵀ / sqrt(d)) v
    out = (to_out(o) [+ x if residual_connection]) / rescale_output_factor

It replaces only diffusers' default processors (``AttnProcessor2_0``, ``AttnProcessor``), on
modules without spatial, cross-attention or q/k norms, grouped k/v heads or a non-default
scale; calls with an ``attention_mask`` or extra arguments go to the processor it replaced.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from diffusion_fast.models.attention import attention
from diffusion_fast.patching.pairs import norm_problem, run_group_norm_silu
from diffusion_fast.patching.report import Record, Replaced, Skipped, backend_scope

KIND = "attention"
DEFAULT_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")


class DiffusionFastAttnProcessor:
    """Attention processor for diffusers' ``Attention`` running our attention function.

    ``original``: the processor it replaced (runs the calls this one does not take);
    ``backend``: what our ops run on ("auto" follows ``diffusion_fast.use_backend``).
    """

    def __init__(self, original, backend: str = "auto") -> None:
        self.original = original
        self.backend = backend

    def __call__(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None, *args, **kwargs) -> Tensor:
        if attention_mask is not None or args or kwargs:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        with backend_scope(self.backend):
            return self._attend(attn, hidden_states, encoder_hidden_states)

    @staticmethod
    def _attend(attn: nn.Module, x: Tensor, context: Optional[Tensor]) -> Tensor:
        residual, spatial = x, x.dim() == 4
        if spatial:  # (B, C, H, W) -> (B, HW, C) tokens
            b, c, hgt, wid = x.shape
            x = x.reshape(b, c, hgt * wid).transpose(1, 2)
        batch = x.shape[0]
        if attn.group_norm is not None:  # over channels: (B, C, L) channels-last view of the tokens
            h = x.transpose(1, 2)
            if norm_problem(attn.group_norm) is None:
                h = run_group_norm_silu(attn.group_norm, h, silu=False)
            else:
                h = attn.group_norm(h)
            x = h.transpose(1, 2)
        context = x if context is None else context
        query, key, value = attn.to_q(x), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        q, k, v = (t.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        out = attention(q, k, v).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # linear, dropout
        if spatial:
            out = out.transpose(-1, -2).reshape(b, c, hgt, wid)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _problem(attn: nn.Module) -> Optional[str]:
    processor = type(attn.processor).__name__
    if processor not in DEFAULT_PROCESSORS:
        return f"processor {processor} is not one of diffusers' defaults {DEFAULT_PROCESSORS}"
    if getattr(attn, "spatial_norm", None) is not None:
        return "spatial_norm (conditional norm) is not supported"
    if getattr(attn, "norm_cross", None) is not None:
        return "cross_attention_norm is not supported"
    if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
        return "qk_norm is not supported"
    if getattr(attn, "added_kv_proj_dim", None) is not None or attn.to_k is None:
        return "added k/v projections are not supported"
    if attn.inner_kv_dim != attn.inner_dim:
        return "grouped k/v heads (kv_heads != heads) are not supported"
    if attn.scale != (attn.inner_dim // attn.heads) ** -0.5:
        return f"scale {attn.scale} is not 1/sqrt(head_dim) (scale_qk=False?)"
    return None


def patch_attention(attn: nn.Module, path: str, backend: str, report) -> Optional[Record]:
    problem = _problem(attn)
    if problem is not None:
        report.skipped.append(Skipped(path, KIND, problem))
        return None
    original = attn.processor
    attn.set_processor(DiffusionFastAttnProcessor(original, backend))
    norm = "" if attn.group_norm is None else ", group_norm fused"
    report.replaced.append(Replaced(path, KIND, f"{type(original).__name__} -> DiffusionFastAttnProcessor{norm}"))
    return Record("attention", backend, original)


def unpatch_attention(attn: nn.Module, record: Record) -> None:
    if isinstance(attn.processor, DiffusionFastAttnProcessor):  # else the user set another since
        attn.set_processor(record.saved)
