"""Scaled dot-product attention for the DDPM UNet (1 head, D = 256/512) and CLIP's text encoder.

    out = softmax(scale * q kᵀ + mask) v,   scale = 1 / sqrt(D) by default   (Vaswani et al. 2017, Eq. 1)
    causal: mask[i, j] = -inf for j > i, aligned top-left as in PyTorch's SDPA: row i of q sees
    keys 0..i also when Sq != Sk (rows i >= Sk see every key). (FlashAttention's own kernels
    align bottom-right instead.)

q: (B, H, Sq, D); k, v: (B, H, Sk, D), Sk >= 1, D <= 512; float16/bfloat16/float32/float64
(float64: not on triton); one dtype and device; any strides. Returns (B, H, Sq, D) in q's dtype.
Differentiable in q, k and v.

Backends (``diffusion_fast.backends``):
- ``cuda``: our C++ kernels, CPU and CUDA (csrc/attention/): the score matrix materialised per chunk
  of batch * heads, S = q kᵀ and out = P v by cuBLAS (oneDNN on the CPU) with fp32 scores, softmax
  and logsumexp in one row kernel; the backward likewise (five matmuls, one row kernel). Made for
  the UNet's single head with D = 256-512, where the matmuls dominate and PyTorch's flash kernel
  stops; float64 too; ops ``attention_fwd/_bwd``.
- ``triton``: kernels/attention.py, FlashAttention-2 forward and backward (Dao 2023) with the
  head dim split into chunks so that D = 512 fits on chip; ops ``attention_triton_fwd/_bwd``.
- ``torch``: ``torch.nn.functional.scaled_dot_product_attention``, which picks its own
  flash / memory-efficient / math kernel. ``attention_ref`` is the plain formula for tests.
``auto``: cuda on CPU tensors (``bench_attention --device cpu``, two runs on a 2-core Zen 5: 0.94-1.07x
SDPA at the UNet's shapes, 1.27-1.7x at CLIP's); on GPU tensors, the fastest of cuda, triton and torch for the
call's (head-dim bucket, sequence bucket, causal, dtype, fwd or fwd+bwd) in the table that
``benchmarks/bench_attention.py`` wrote for this GPU (``benchmarks/results/*/bench_attention_table.json``,
or the files in ``DIFFUSION_FAST_ATTENTION_TABLE``), else cuda for D > 256 (PyTorch's flash
kernel stops at 256; plain bf16 matmuls beat SDPA there 2.4x forward and 8x fwd+bwd on an H100)
and torch otherwise. ``diffusion_fast.env_info()["auto_rules"]`` says which.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_fast import backends

__all__ = ["attention", "attention_ref", "table_key", "auto_choice"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
MAX_HEAD_DIM = 512  # kernels/attention.py's limit, and this op's
MAX_BATCH_HEADS = 65535  # B * H: grid axis 1 of the Triton kernels


def attention_ref(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: Optional[float] = None,
                  *, upcast: bool = True) -> Tensor:
    """Plain PyTorch: softmax(scale q kᵀ [+ causal mask]) v, the score matrix materialised.

    ``upcast`` computes in float32 (or q's dtype if wider); the result is in q's dtype.
    """
    compute = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q.to(compute) @ k.to(compute).transpose(-1, -2)) * scale
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, -math.inf)
    return (torch.softmax(s, dim=-1) @ v.to(compute)).to(q.dtype)


# ---------------------------------------------------------------------------
# Op schemas, defined once: ``attention_fwd``/``_bwd`` implemented in C++ (csrc/attention/, CPU and
# CUDA dispatch keys), the ``_triton`` twins by kernels/attention.py. lse: (B, H, Sq) natural-log
# logsumexp of each row of the scaled scores, float32 (float64 for float64 q), kept for the backward.
# ---------------------------------------------------------------------------
FWD_SCHEMA = "(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor out, Tensor lse)"
BWD_SCHEMA = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, "
              "float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)")
OPS = {"cuda": "attention", "triton": "attention_triton"}
IMPLEMENTED = ("cuda", "triton", "torch")

for _name in OPS.values():
    backends.LIBRARY.define(_name + "_fwd" + FWD_SCHEMA)
    backends.LIBRARY.define(_name + "_bwd" + BWD_SCHEMA)


def _fake_fwd(q, k, v, causal, scale):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=lse_dtype)


def _fake_bwd(grad_out, q, k, v, out, lse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _make_backward(bwd_op):
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grad_q, grad_k, grad_v = bwd_op(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale)
        return grad_q, grad_k, grad_v, None, None

    return backward


for _name in OPS.values():
    backends.register_fwd_bwd(_name, _fake_fwd, _fake_bwd, _make_backward, _setup_context)
_FWD = {backend: getattr(torch.ops.diffusion_fast, name + "_fwd").default for backend, name in OPS.items()}


# ---------------------------------------------------------------------------
# auto: a per-shape winner table measured by benchmarks/bench_attention.py on each GPU model.
# ---------------------------------------------------------------------------
TABLE_FILE = "bench_attention_table.json"
TABLE_ENV = "DIFFUSION_FAST_ATTENTION_TABLE"  # os.pathsep-separated files; replaces the search
# benchmarks/ installs as diffusion_fast.benchmarks with its tables as package data (pyproject);
# in a source checkout it sits beside the package.
RESULTS = (Path(__file__).resolve().parents[1] / "benchmarks" / "results",
           Path(__file__).resolve().parents[2] / "benchmarks" / "results")
DEFAULT_RULE = "cuda if head_dim > 256 (beyond PyTorch's flash kernel) else torch (SDPA)"


def _bucket(n, lowest: int) -> int:
    """The smallest power of two >= n, at least ``lowest`` (a loop: works on traced sizes)."""
    b = lowest
    while b < n:
        b *= 2
    return b


def table_key(head_dim: int, seq_q: int, seq_k: int, causal: bool, dtype: torch.dtype, mode: str) -> tuple:
    """The table's key of one call: (head-dim bucket, sequence bucket of max(Sq, Sk), causal,
    dtype name, "fwd" or "fwd+bwd"). Buckets are powers of two (head dim >= 16, sequence >= 64)."""
    return (_bucket(head_dim, 16), _bucket(max(seq_q, seq_k), 64), bool(causal), DTYPE_NAMES[dtype], mode)


def _load_tables() -> tuple:
    """({device name: dict(path, date, winners={key: backend})}, errors): newest table per GPU model."""
    listed = [Path(p) for p in os.environ.get(TABLE_ENV, "").split(os.pathsep) if p]
    tables, errors = {}, []
    found = {p.resolve() for results in RESULTS for p in results.glob("*/" + TABLE_FILE)}
    for path in listed or sorted(found):
        try:
            data = json.loads(path.read_text())
            winners = {(e["head_dim"], e["seq"], bool(e["causal"]), e["dtype"], e["mode"]): e["backend"]
                       for e in data["entries"] if e["backend"] in IMPLEMENTED}
            name, date = data["device_name"], str(data.get("date", ""))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            errors.append(f"{path}: {type(exc).__name__}: {exc}")
            continue
        if name not in tables or date > tables[name]["date"]:
            tables[name] = dict(path=str(path), date=date, winners=winners)
    return tables, errors


_TABLES, _TABLE_ERRORS = _load_tables()  # file reads only; matched to a GPU on first use


@torch.compiler.assume_constant_result
def _device_name(index: int) -> str:
    """The GPU's model name (a constant to torch.compile)."""
    return torch.cuda.get_device_name(index)


def auto_choice(device_name: str, key: tuple) -> str:
    """"cuda", "triton" or "torch" for a GPU call: the table's winner for ``key`` (``table_key``),
    else the default rule (the key's head-dim bucket is > 256 exactly when the head dim is)."""
    table = _TABLES.get(device_name)
    winner = table["winners"].get(key) if table is not None else None
    return winner or ("cuda" if key[0] > 256 else "torch")


def _auto_order(q: Tensor, k: Tensor, causal: bool, mode: str) -> tuple:
    """Backends auto tries for this call, best first; torch, which runs anything, last."""
    if q.device.type != "cuda":
        return ("cuda", "torch")
    key = table_key(q.shape[-1], q.shape[-2], k.shape[-2], causal, q.dtype, mode)
    choice = auto_choice(_device_name(q.device.index or 0), key)
    return tuple(dict.fromkeys((choice, "torch")))


def _describe_auto() -> dict:
    """env_info()'s entry: the rule and where the current GPU's choices come from."""
    source = "CPU tensors: always cuda (our C++ CPU kernels)"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        table = _TABLES.get(name)
        source = (f"{table['path']} ({len(table['winners'])} keys; other keys: {DEFAULT_RULE})" if table
                  else f"no benchmark table for {name}: {DEFAULT_RULE}")
    return dict(rule="CPU: cuda (C++). GPU: the fastest of cuda, triton and torch per (head_dim bucket, seq "
                     "bucket, causal, dtype, fwd|fwd+bwd) from bench_attention's table for this GPU model, else "
                     f"{DEFAULT_RULE}; torch where the choice cannot run the call",
                source=source, tables={n: t["path"] for n, t in _TABLES.items()}, table_errors=_TABLE_ERRORS)


backends.register_auto_rule("attention", _describe_auto)


# ---------------------------------------------------------------------------
# Argument checks: every bad input gets a ValueError/TypeError naming the argument.
# ---------------------------------------------------------------------------
def _check_inputs(q, k, v, causal, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention: {name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"attention: {name} must be a floating tensor ({', '.join(map(str, FLOAT_DTYPES))}), "
                            f"got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must have shape (batch, heads, seq, head_dim), got a {t.dim()}-D "
                             f"tensor of shape {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"attention: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"attention: {name} is on {t.device} but q is on {q.device}; move them to one device")
    b, h, _, d = q.shape
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"attention: q's head dim (last dim) must be in [1, {MAX_HEAD_DIM}], got {d}")
    for name, t in (("k", k), ("v", v)):
        if (t.shape[0], t.shape[1], t.shape[3]) != (b, h, d):
            raise ValueError(f"attention: {name} must have shape ({b}, {h}, seq_k, {d}) to match q "
                             f"{tuple(q.shape)}, got {tuple(t.shape)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"attention: v must have k's sequence length {k.shape[2]}, got {v.shape[2]}")
    if k.shape[2] == 0:
        raise ValueError("attention: k must hold at least one key (seq_k >= 1), got seq_k = 0")
    if not isinstance(causal, bool):
        raise TypeError(f"attention: causal must be a bool, got {type(causal).__name__}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"attention: scale must be a float or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"attention: scale must be finite, got {scale}")


def _unsupported(backend: str, q: Tensor) -> Optional[str]:
    """Why ``backend`` cannot run attention on q (None when it can)."""
    if backend == "triton" and q.shape[0] * q.shape[1] > MAX_BATCH_HEADS:
        return f"Triton attention takes batch * heads <= {MAX_BATCH_HEADS}, got {q.shape[0] * q.shape[1]}"
    return backends.unsupported(backend, q)


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: Optional[float] = None) -> Tensor:
    """softmax(scale q kᵀ [+ causal mask]) v per batch and head (module doc; Vaswani et al. 2017, Eq. 1).

    q: (B, H, Sq, D); k, v: (B, H, Sk, D); ``causal`` masks keys j > i (top-left, as SDPA's
    ``is_causal``); ``scale`` defaults to 1 / sqrt(D). Returns (B, H, Sq, D) in q's dtype.
    """
    _check_inputs(q, k, v, causal, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    auto = _auto_order(q, k, causal, "fwd+bwd" if grad else "fwd")
    backend = backends.select("attention", q, _unsupported, auto=auto, implemented=IMPLEMENTED)
    if backend == "torch":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return _FWD[backend](q, k, v, causal, scale)[0]


# The Triton ops run kernels/attention.py, imported on first use so that importing
# diffusion_fast never imports triton. CPU tensors reach them only under TRITON_INTERPRET=1.
def _triton_fwd(*args):
    from diffusion_fast.kernels import attention as kernels

    return kernels.attention_fwd(*args)


def _triton_bwd(*args):
    from diffusion_fast.kernels import attention as kernels

    return kernels.attention_bwd(*args)


for _key in ("CPU", "CUDA"):
    backends.LIBRARY.impl(OPS["triton"] + "_fwd", _triton_fwd, _key)
    backends.LIBRARY.impl(OPS["triton"] + "_bwd", _triton_bwd, _key)
