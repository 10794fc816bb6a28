"""OpenAI CLIP / open_clip checkpoints -> CLIPTextEncoder.

CLIPTextEncoder's parameter names are those of the text tower in OpenAI's ``clip/model.py`` and
open_clip's ``CLIP`` (both keep it at the top level of the model), so the weights copy one to one:

    token_embedding.weight (V, W)     positional_embedding (C, W)     text_projection (W, E)
    transformer.resblocks.N.{ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj,
                             ln_2, mlp.c_fc, mlp.c_proj}.{weight, bias}
    ln_final.{weight, bias}

A full-CLIP state dict also holds the image tower (``visual.*``), ``logit_scale`` (and
open_clip's optional ``logit_bias``), and, in OpenAI's JIT archives, ``input_resolution``,
``context_length`` and ``vocab_size``: those are skipped. open_clip is never imported here.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from diffusion_fast.models.clip_text import CLIPTextEncoder
from diffusion_fast.models.convert import check_state_dict

__all__ = ["clip_text_from_open_clip"]

_NOT_TEXT = ("logit_scale", "logit_bias", "input_resolution", "context_length", "vocab_size")
_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.")
_SHAPE_KEYS = ("token_embedding.weight", "positional_embedding", "text_projection",
               "transformer.resblocks.0.mlp.c_fc.weight")


def _text_tower(state: Mapping) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("visual.") and k not in _NOT_TEXT}


def _config_from_state_dict(state: Mapping, heads: Optional[int]) -> dict:
    """CLIPTextEncoder kwargs read off the shapes; heads defaults to width // 64 (OpenAI's rule)."""
    if missing := [k for k in _SHAPE_KEYS if k not in state]:
        raise ValueError(f"clip_text_from_open_clip: cannot read the architecture, missing keys {missing}; "
                         f"pass model= to load into a CLIPTextEncoder you built")
    vocab, width = state["token_embedding.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK.match(k)))
    return dict(vocab_size=vocab, context_length=state["positional_embedding"].shape[0], width=width,
                heads=width // 64 if heads is None else heads, layers=layers,
                embed_dim=state["text_projection"].shape[1],
                mlp_ratio=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width)


def clip_text_from_open_clip(source, *, model: Optional[CLIPTextEncoder] = None, heads: Optional[int] = None,
                             quick_gelu: Optional[bool] = None, backend: Optional[str] = None) -> CLIPTextEncoder:
    """A CLIPTextEncoder holding the text tower of an open_clip/OpenAI CLIP model or state dict.

    source: an open_clip ``CLIP`` (heads, activation and LayerNorm eps are read from it) or a state
    dict in the OpenAI/open_clip layout, text tower only or whole CLIP (the image tower and
    ``logit_scale`` are skipped). For a state dict the sizes are read off the shapes; pass ``heads``
    if it is not width // 64 (it is for every OpenAI model) and ``quick_gelu=False`` for checkpoints
    trained with exact GELU (open_clip's non-"-quickgelu" configs, e.g. the LAION ones); OpenAI's
    use QuickGELU, the default. model: load into this CLIPTextEncoder instead of building one.
    Weights are copied in the model's dtype. Raises ValueError naming every missing or unexpected
    key and every shape mismatch.
    """
    if isinstance(source, nn.Module):
        if not all(hasattr(source, a) for a in ("encode_text", "token_embedding", "transformer", "ln_final")):
            raise TypeError(f"clip_text_from_open_clip: source must be an open_clip CLIP (text tower at the top "
                            f"level) or a state dict, got {type(source).__name__}")
        if getattr(source, "text_pool_type", "argmax") != "argmax" or getattr(source, "attn_mask", 0) is None:
            raise ValueError(f"clip_text_from_open_clip: source must pool at the largest token id with a causal "
                             f"mask, as CLIP does; got text_pool_type={getattr(source, 'text_pool_type', None)!r}, "
                             f"causal mask {'absent' if getattr(source, 'attn_mask', 0) is None else 'present'}")
        block = source.transformer.resblocks[0]
        heads = block.attn.num_heads if heads is None else heads
        quick_gelu = type(block.mlp.gelu).__name__ == "QuickGELU" if quick_gelu is None else quick_gelu
        eps, state = source.ln_final.eps, source.state_dict()
    elif isinstance(source, Mapping):
        eps, state = 1e-5, source
    else:
        raise TypeError(f"clip_text_from_open_clip: source must be an open_clip CLIP or a state dict, "
                        f"got {type(source).__name__}")
    if any(not isinstance(v, Tensor) for v in state.values()):
        raise TypeError("clip_text_from_open_clip: every value of the state dict must be a Tensor")
    state = _text_tower(state)
    if model is None:
        kwargs = _config_from_state_dict(state, heads)
        model = CLIPTextEncoder(**kwargs, quick_gelu=True if quick_gelu is None else quick_gelu, eps=eps,
                                backend=backend)
    elif not isinstance(model, CLIPTextEncoder):
        raise TypeError(f"clip_text_from_open_clip: model must be a CLIPTextEncoder, got {type(model).__name__}")
    own = model.state_dict()
    check_state_dict(state, {k: v.shape for k, v in own.items()},
                     f"clip_text_from_open_clip: checkpoint does not match CLIPTextEncoder({model.extra_repr()})")
    with torch.no_grad():
        for key, value in own.items():
            value.copy_(state[key])
    return model
