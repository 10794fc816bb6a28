"""CLIP's tokenizer: byte-level BPE with a 49,408-token vocabulary (Radford et al. 2021, Sec. 2.4).

The vocabulary and merges ship with open_clip (``pip install 'diffusion_fast[clip]'``, i.e.
``open_clip_torch``), which is imported on first use only.
"""

from __future__ import annotations

import functools
from typing import Sequence, Union

import torch
from torch import Tensor

__all__ = ["clip_tokenize"]

CONTEXT_LENGTH = 77


@functools.lru_cache(maxsize=1)
def _tokenizer():
    try:
        import open_clip
    except ImportError as exc:
        raise ImportError("clip_tokenize needs open_clip, which ships CLIP's BPE vocabulary: "
                          "pip install 'diffusion_fast[clip]' (or pip install open_clip_torch)") from exc
    return open_clip.get_tokenizer("ViT-B-32")  # CLIP's SimpleTokenizer, shared by every OpenAI model


def clip_tokenize(texts: Union[str, Sequence[str]], context_length: int = CONTEXT_LENGTH, *,
                  truncate: bool = False) -> Tensor:
    """Token ids for CLIPTextEncoder: (len(texts), context_length) int64.

    Each row is <start_of_text> (49406), the BPE ids of the cleaned, lower-cased text,
    <end_of_text> (49407), then zeros. A text with more than ``context_length - 2`` BPE tokens
    raises ValueError, or with ``truncate=True`` is cut to ``context_length`` ids whose last is
    <end_of_text> (what open_clip's ``tokenize`` always does).
    """
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Sequence) or not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError("clip_tokenize: texts must be a str or a non-empty sequence of str, "
                        f"got {type(texts).__name__}")
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
        raise ValueError(f"clip_tokenize: context_length must be an int >= 2, got {context_length!r}")
    tok = _tokenizer()
    sot, eot = tok.sot_token_id, tok.eot_token_id
    out = torch.zeros(len(texts), context_length, dtype=torch.int64)
    for i, text in enumerate(texts):
        ids = [sot] + tok.encode(text) + [eot]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(f"clip_tokenize: texts[{i}] has {len(ids)} tokens with start and end, more than "
                                 f"context_length={context_length}; shorten it or pass truncate=True "
                                 f"(text starts {text[:40]!r})")
            ids = ids[:context_length - 1] + [eot]
        out[i, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return out
