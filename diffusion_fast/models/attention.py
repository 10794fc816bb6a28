"""The one attention call every model in diffusion_fast goes through.

Models call ``attention(q, k, v)`` and nothing else, so a faster attention op (a custom
kernel, a different SDPA backend) replaces this function and every model picks it up.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["attention"]


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / sqrt(d)) v, per batch and head (Vaswani et al. 2017, Eq. 1).

    q: (B, heads, L, d); k, v: (B, heads, S, d); same dtype and device. Returns (B, heads, L, d)
    in q's dtype. Runs ``torch.nn.functional.scaled_dot_product_attention`` (no mask, no
    dropout), which picks its own fused kernel per device and dtype.
    """
    return F.scaled_dot_product_attention(q, k, v)
