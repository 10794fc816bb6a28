"""CLIP's symmetric contrastive loss (Radford et al. 2021, Sec. 2.3 and Fig. 3; InfoNCE, van den Oord et al. 2018).

For N matching (text, image) pairs, with t_n = t / ||t|| and i_n = i / ||i|| row-wise:

    logits = exp(s) · t_n i_nᵀ                                  # (N, N), s the learned log-temperature
    loss   = (CE(logits, diag) + CE(logitsᵀ, diag)) / 2         # text->image and image->text

s starts at log(1 / 0.07) and the scale exp(s) is clipped at 100 (Sec. 2.5).
"""

from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["clip_loss", "ContrastiveHead"]

INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100.0)


def clip_loss(text_emb: Tensor, image_emb: Tensor, logit_scale: Union[Tensor, float]) -> Tensor:
    """Mean of the text->image and image->text cross-entropies; row n of each input is a matching pair.

    text_emb, image_emb: (N, D) floating, same shape (unnormalised; they are L2-normalised here).
    logit_scale: the log of the logit scale (a 0-dim tensor, e.g. a learned parameter, or a float).
    Returns a 0-dim tensor; fp16/bf16 logits are taken to float32 for the softmax.
    """
    for name, t in (("text_emb", text_emb), ("image_emb", image_emb)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"clip_loss: {name} must be a floating Tensor, got "
                            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
        if t.dim() != 2 or t.shape[0] == 0:
            raise ValueError(f"clip_loss: {name} must have shape (N, D) with N >= 1, got {tuple(t.shape)}")
    if text_emb.shape != image_emb.shape:
        raise ValueError(f"clip_loss: text_emb and image_emb must have the same shape (N, D), got "
                         f"{tuple(text_emb.shape)} and {tuple(image_emb.shape)}")
    if isinstance(logit_scale, Tensor) and logit_scale.numel() != 1:
        raise ValueError(f"clip_loss: logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
    if not isinstance(logit_scale, (Tensor, int, float)) or isinstance(logit_scale, bool):
        raise TypeError(f"clip_loss: logit_scale must be a Tensor or a float, got {type(logit_scale).__name__}")
    scale = logit_scale.reshape(()).exp() if isinstance(logit_scale, Tensor) else math.exp(logit_scale)
    logits = scale * (F.normalize(text_emb, dim=-1) @ F.normalize(image_emb, dim=-1).T)  # (N, N)
    if logits.element_size() < 4:
        logits = logits.float()
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class ContrastiveHead(nn.Module):
    """The learnable temperature of CLIP and its loss: forward(text_emb, image_emb) -> 0-dim loss.

    ``logit_scale`` (a 0-dim parameter, as in OpenAI's and open_clip's CLIP) starts at
    ``init_logit_scale`` = log(1/0.07); the scale used is exp(min(logit_scale, max_logit_scale)),
    at most 100 by default.
    """

    def __init__(self, init_logit_scale: float = INIT_LOGIT_SCALE, max_logit_scale: float = MAX_LOGIT_SCALE) -> None:
        super().__init__()
        if not (isinstance(init_logit_scale, (int, float)) and math.isfinite(init_logit_scale)):
            raise ValueError(f"ContrastiveHead: init_logit_scale must be a finite number, got {init_logit_scale!r}")
        if not isinstance(max_logit_scale, (int, float)) or math.isnan(max_logit_scale):
            raise ValueError(f"ContrastiveHead: max_logit_scale must be a number, got {max_logit_scale!r}")
        self.max_logit_scale = float(max_logit_scale)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    def forward(self, text_emb: Tensor, image_emb: Tensor) -> Tensor:
        return clip_loss(text_emb, image_emb, self.logit_scale.clamp(max=self.max_logit_scale))

    def extra_repr(self) -> str:
        return f"logit_scale={self.logit_scale.item():.4f}, max_logit_scale={self.max_logit_scale:.4f}"
