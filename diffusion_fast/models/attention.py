"""The one attention call every model in diffusion_fast goes through.

Models call ``attention(q, k, v)`` and nothing else, so a faster attention op (a custom
kernel, a different SDPA backend) replaces this function and every model picks it up.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["attention"]


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    """softmax(q kᵀ / sqrt(d) + M) v, per batch and head (Vaswani et al. 2017, Eq. 1).

    q: (B, heads, L, d); k, v: (B, heads, S, d); same dtype and device. Returns (B, heads, L, d)
    in q's dtype. M = 0, or with ``causal=True`` M[i, j] = -inf for j > i (query i sees keys
    0..i; decoder self-attention, Vaswani et al. 2017 Sec. 3.2.3). Runs
    ``torch.nn.functional.scaled_dot_product_attention`` (no dropout), which picks its own
    fused kernel per device and dtype.
    """
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
