"""The one attention call every model in diffusion_fast goes through.

Models call ``attention(q, k, v[, causal])`` and nothing else, so that the attention op
(``diffusion_fast.ops.attention``: our C++/CUDA or Triton kernels or PyTorch's SDPA, chosen per
shape by the backend) serves every model.
"""

from __future__ import annotations

from torch import Tensor

from diffusion_fast.ops.attention import attention as _attention_op

__all__ = ["attention"]


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    """softmax(q kᵀ / sqrt(d) + M) v, per batch and head (Vaswani et al. 2017, Eq. 1).

    q: (B, heads, L, d); k, v: (B, heads, S, d); same dtype and device. Returns (B, heads, L, d)
    in q's dtype. M = 0, or with ``causal=True`` M[i, j] = -inf for j > i (query i sees keys
    0..i; decoder self-attention, Vaswani et al. 2017 Sec. 3.2.3). Runs ``diffusion_fast.attention``,
    which follows ``diffusion_fast.use_backend``: ``triton`` or ``torch`` (SDPA); ``auto`` picks
    per shape.
    """
    return _attention_op(q, k, v, causal=causal)
