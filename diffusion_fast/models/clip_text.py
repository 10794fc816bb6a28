"""CLIPTextEncoder: the text tower of CLIP (Radford et al. 2021, Sec. 2.4; OpenAI ``clip/model.py``,
open_clip ``TextTransformer``).

    x = token_embedding[tokens] + positional_embedding[:L]          # (B, L, width)
    for each of ``layers`` blocks (pre-LayerNorm):
        x = x + out_proj(causal_attention(in_proj(ln_1(x))))         # masked self-attention, ``heads`` heads
        x = x + c_proj(act(c_fc(ln_2(x))))                           # MLP width -> 4 width -> width
    x = ln_final(x)
    pooled = x[b, argmax_l tokens[b, l]]                             # the end-of-text token (largest id)
    return pooled @ text_projection                                  # (B, embed_dim), no bias

``act`` is QuickGELU, x·σ(1.702x), as in OpenAI's CLIP (``quick_gelu=True``); open_clip's own
'ViT-B-32' config and the LAION checkpoints use exact GELU (``quick_gelu=False``). LayerNorms
have eps 1e-5. Parameter names are those of OpenAI's and open_clip's state dicts
(``transformer.resblocks.N.attn.in_proj_weight``, ``mlp.c_fc``, ``ln_final``, ...), so their
text-tower weights load one to one (``diffusion_fast.models.clip_convert``).

Attention goes through ``diffusion_fast.models.attention.attention(..., causal=True)``; the
``backend=`` switch picks the implementation of our ops for this model. LayerNorm stays
``torch.nn.LayerNorm``: it is already one kernel, and none of our ops fuses it with its neighbours.
On the CPU without autograd, with our backends, the linears run through oneDNN with prepacked
weights (``diffusion_fast.models.onednn``): 2.2-2.4x MKL's GEMM at ViT-B/32's sizes, batch 64, on
this project's AMD CPU (where MKL does not take its AVX-512 path).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_fast import backends
from diffusion_fast.backends import check_optional_name, maybe_use_backend
from diffusion_fast.models import onednn
from diffusion_fast.models.attention import attention
from diffusion_fast.models.blocks import Linear
from diffusion_fast.models.param_cache import derived_params

__all__ = ["CLIPTextEncoder", "QuickGELU"]


class QuickGELU(nn.Module):
    """x·σ(1.702x): the sigmoid approximation of GELU (Hendrycks & Gimpel 2016, Sec. 2) that CLIP uses."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask and one fused QKV projection.

    ``in_proj_weight`` (3 width, width) stacks W_q, W_k, W_v by rows and ``in_proj_bias`` (3 width,)
    their biases, as ``nn.MultiheadAttention`` does; ``out_proj`` is Linear(width, width).
    forward(x: (B, L, width)) -> (B, L, width), x's dtype.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, seq, width = x.shape
        qkv = onednn.prepacked_linear(self, "_in_proj_onednn", x, self.in_proj_weight, self.in_proj_bias)
        # qkv: (B, L, 3 width)
        q, k, v = qkv.view(b, seq, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, L, d) each
        out = attention(q, k, v, causal=True)  # (B, H, L, d)
        return self.out_proj(out.transpose(1, 2).reshape(b, seq, width))


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x)). (B, L, width) -> same."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool, eps: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", Linear(width, hidden)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", Linear(hidden, width)),
        ]))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self._mlp(self.ln_2(x))

    def _mlp(self, x: Tensor) -> Tensor:
        """c_proj(act(c_fc(x))); on oneDNN (see ``onednn``) as two GEMMs with the activation in the
        first one's epilogue. QuickGELU(z) = silu(1.702 z) / 1.702, so c_fc's weight and bias are
        packed times 1.702 and c_proj's weight divided by it, and oneDNN's swish applies."""
        fc, act, proj = self.mlp.c_fc, self.mlp.gelu, self.mlp.c_proj
        rows = x.numel() // x.shape[-1]
        quick = isinstance(act, QuickGELU)
        if (rows < onednn.MIN_ROWS or not (quick or isinstance(act, nn.GELU))
                or onednn.unsupported(x, fc.weight, fc.bias, proj.weight, proj.bias) is not None):
            return self._mlp_folded(x) if quick else self.mlp(x)
        s = 1.702 if quick else 1.0

        def run():
            w_fc, b_fc = derived_params(self, "_fc_onednn", (fc.weight, fc.bias),
                                        lambda w, b: (onednn.pack_linear(w * s, rows), b * s), extra=(rows,))
            w_proj = derived_params(self, "_proj_onednn", (proj.weight,),
                                    lambda w: onednn.pack_linear(w / s, rows), extra=(rows,))
            h = onednn.linear(x, w_fc, b_fc, "swish", "") if quick else onednn.linear(x, w_fc, b_fc, "gelu",
                                                                                         act.approximate)
            return onednn.linear(h, w_proj, proj.bias)

        y = onednn.guarded(run)
        return self.mlp(x) if y is None else y

    def _mlp_folded(self, x: Tensor) -> Tensor:
        """The QuickGELU MLP on ATen (GPUs; CPU inputs oneDNN does not take) with the oneDNN path's folding:
        c_proj / 1.702 applied to silu(1.702 c_fc(x)), one silu kernel where QuickGELU takes three (mul,
        sigmoid, mul over the 4x-wide activation), the scaled weights kept between calls (``derived_params``).
        Only without autograd through the MLP (as the oneDNN path: gradients stay the plain MLP's), outside
        torch.compile (which fuses the activation itself) and off the eager baseline (backend "torch");
        else ``self.mlp``."""
        fc, proj = self.mlp.c_fc, self.mlp.c_proj
        params = (fc.weight, fc.bias, proj.weight)
        if (fc.bias is None or torch.compiler.is_compiling() or backends.current() == "torch"
                or (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)))):
            return self.mlp(x)
        w_fc, b_fc = derived_params(self, "_fc_folded", params[:2], lambda w, b: (w * 1.702, b * 1.702))
        w_proj = derived_params(self, "_proj_folded", params[2:], lambda w: w / 1.702)
        return F.linear(F.silu(F.linear(x, w_fc, b_fc)), w_proj, proj.bias)


class CLIPTextEncoder(nn.Module):
    """CLIP's text transformer. forward(tokens: (B, L) int ids, L <= context_length) -> (B, embed_dim)
    in the parameters' dtype; ``normalize=True`` returns unit-norm rows.

    Tokens come from ``diffusion_fast.models.clip_tokenize`` (start-of-text, BPE ids, end-of-text,
    zero padding). Each row is pooled at its largest id, which is the end-of-text token (49407 in
    CLIP's vocabulary). The causal mask means a row gives the same result with or without the
    padding after its end-of-text token, so L may be shorter than ``context_length``.

    ``backend`` ("auto", "cuda", "triton", "torch", or None to follow ``diffusion_fast.use_backend``
    and ``DIFFUSION_FAST_BACKEND``) picks the implementation of our ops (attention) for this model;
    ``forward(..., backend=...)`` overrides it per call.
    """

    def __init__(
        self,
        *,
        vocab_size: int = 49408,
        context_length: int = 77,
        width: int = 512,
        heads: int = 8,
        layers: int = 12,
        embed_dim: int = 512,
        mlp_ratio: float = 4.0,
        quick_gelu: bool = True,
        eps: float = 1e-5,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.config = dict(vocab_size=vocab_size, context_length=context_length, width=width, heads=heads,
                           layers=layers, embed_dim=embed_dim, mlp_ratio=mlp_ratio, quick_gelu=quick_gelu, eps=eps)
        self._check_config()
        self.backend = check_optional_name(backend, "CLIPTextEncoder: backend")
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu, eps) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width, eps=eps)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """CLIP's initialisation (OpenAI ``initialize_parameters``): normal with std 0.02 for tokens,
        0.01 for positions, width^-1/2 for QKV and the projection, (2 width)^-1/2 for c_fc, and
        width^-1/2 (2 layers)^-1/2 for the two output projections; attention biases zero."""
        width, layers = self.config["width"], self.config["layers"]
        proj_std, attn_std, fc_std = width ** -0.5 * (2 * layers) ** -0.5, width ** -0.5, (2 * width) ** -0.5
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    # ------------------------------------------------------------------ configs
    @classmethod
    def vit_b_32(cls, **overrides) -> "CLIPTextEncoder":
        """The text tower of CLIP ViT-B/32 (and B/16): width 512, 8 heads, 12 layers, 63,428,096 parameters."""
        return cls(**{**dict(width=512, heads=8, layers=12, embed_dim=512), **overrides})

    @classmethod
    def vit_l_14(cls, **overrides) -> "CLIPTextEncoder":
        """The text tower of CLIP ViT-L/14: width 768, 12 heads, 12 layers, 123,650,304 parameters."""
        return cls(**{**dict(width=768, heads=12, layers=12, embed_dim=768), **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "CLIPTextEncoder":
        """A small network of the same layout for tests and CPU demos (vocab 1000, width 64, 2 layers)."""
        return cls(**{**dict(vocab_size=1000, width=64, heads=4, layers=2, embed_dim=32), **overrides})

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: Tensor, *, normalize: bool = False, backend: Optional[str] = None) -> Tensor:
        x = self.forward_tokens(tokens, backend=backend)
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # (B, width)
        out = pooled @ self.text_projection
        return F.normalize(out, dim=-1) if normalize else out

    def forward_tokens(self, tokens: Tensor, *, backend: Optional[str] = None) -> Tensor:
        """Per-token features after ``ln_final``: (B, L, width), before pooling and projection."""
        self._check_tokens(tokens)
        backend = check_optional_name(backend, "CLIPTextEncoder: forward(backend=)") or self.backend
        with maybe_use_backend(backend):
            x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
            for block in self.transformer.resblocks:
                x = block(x)
            return self.ln_final(x)

    # ------------------------------------------------------------------ checks
    def _check_config(self) -> None:
        cfg = self.config
        for name in ("vocab_size", "context_length", "width", "heads", "layers", "embed_dim"):
            value = cfg[name]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"CLIPTextEncoder: {name} must be a positive int, got {value!r}")
        if cfg["width"] % cfg["heads"]:
            raise ValueError(f"CLIPTextEncoder: heads={cfg['heads']} must divide width={cfg['width']}")
        if not (isinstance(cfg["mlp_ratio"], (int, float)) and int(cfg["width"] * cfg["mlp_ratio"]) > 0):
            raise ValueError(f"CLIPTextEncoder: mlp_ratio must be a positive number, got {cfg['mlp_ratio']!r}")
        if not (isinstance(cfg["eps"], (int, float)) and cfg["eps"] > 0 and math.isfinite(cfg["eps"])):
            raise ValueError(f"CLIPTextEncoder: eps must be a positive number, got {cfg['eps']!r}")

    def _check_tokens(self, tokens) -> None:
        if not isinstance(tokens, Tensor):
            raise TypeError(f"CLIPTextEncoder: tokens must be a Tensor of token ids, got {type(tokens).__name__}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"CLIPTextEncoder: tokens must be int64 or int32 ids, got {tokens.dtype}")
        ctx = self.config["context_length"]
        if tokens.dim() != 2 or tokens.shape[0] == 0 or not 1 <= tokens.shape[1] <= ctx:
            raise ValueError(f"CLIPTextEncoder: tokens must have shape (B, L) with B >= 1 and 1 <= L <= {ctx}, "
                             f"got {tuple(tokens.shape)}")

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items()) + f", backend={self.backend}"
