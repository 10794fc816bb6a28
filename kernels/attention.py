"""Triton flash attention (``diffusion_fast.attention``): forward and backward; launchers only.

FlashAttention-2 (Dao 2023, Alg. 1 forward, Alg. 2 backward) for (B, H, S, D) tensors:

    S = scale * Q Kᵀ  (causal: S[i, j] = -inf for j > i, top-left aligned as in PyTorch's SDPA)
    O = softmax(S) V, by an online softmax over key tiles (running max m, running sum l);
    lse[i] = log sum_j exp(S[i, j]), stored (fp32) for the backward
    backward, with P = exp(S - lse) recomputed and delta[i] = sum_d dO[i, d] O[i, d]:
    dV = Pᵀ dO;  dP = dO Vᵀ;  dS = P * (dP - delta);  dQ = scale dS K;  dK = scale dSᵀ Q

Scores are kept in log2 units (qk_scale = scale * log2 e) so the kernels use exp2. Every sum
and accumulator is fp32; P and dS are cast to the input dtype before their matmuls, as in
FlashAttention. No score matrix is materialised: kernels hold [BLOCK_M, BLOCK_N] tiles only.

Large head dims (DDPM: D = 256, 512 with a single head) do not fit the resident tiles of the
usual kernels, so D is padded to D_PAD = next power of 2 (>= 16; pad columns are masked) and
the contractions over D (Q Kᵀ, dO Vᵀ) run in chunks of BLOCK_D = min(D_PAD, 128) columns (64 for fp32),
streamed from L2 per key tile; only the fp32 accumulators ([rows, D_PAD]: O, dQ, or dK and
dV) stay resident. With D_PAD <= 128 (one chunk) the program's fixed tiles are loaded once.

Kernels (grid axis 1: batch * head; axis 0: query or key tiles):
    _attention_fwd_kernel        (cdiv(Sq, BLOCK_M), B*H)  O, lse
    _attention_fwd_tma_kernel    the same, q, k and v read through TMA tensor descriptors (Hopper's bulk
                                 asynchronous copies: no per-element addresses, masks or registers for the
                                 loads); 16-bit inputs with D a power of two, q resident. Only where a caller
                                 asks (``blocks={"TMA": True}``): benchmarks/probes/attention_fwd_sweep.py
                                 times it against the pointer kernel, which stays the default until then.
    _attention_bwd_delta_kernel  (cdiv(Sq, BLOCK_M), B*H)  delta = rowsum(dO * O)
    _attention_bwd_dkdv_kernel   (cdiv(Sk, BLOCK_N), B*H)  dK, dV: loop over query tiles
    _attention_bwd_dq_kernel     (cdiv(Sq, BLOCK_M), B*H)  dQ: loop over key tiles
Causal: key tiles past the diagonal of a query tile (and query tiles before a key tile) are
skipped by the loop bounds; the diagonal tiles are masked.

Limits (``diffusion_fast.ops.attention._unsupported``): fp16/bf16/fp32, D <= 512, q, k, v
of one dtype and head dim, B * H <= 65535 (grid axis 1). Inputs may have any strides;
outputs and gradients are contiguous. fp32 matmuls use IEEE fp32 unless
``torch.get_float32_matmul_precision()`` allows TF32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from diffusion_fast.kernels.launch import cdiv, next_power_of_2

__all__ = ["attention_fwd", "attention_bwd"]

LOG2E = math.log2(math.e)

# Block sizes per padded head dim D_PAD and element size (2: fp16/bf16, 4: fp32), as
# (BLOCK_M, BLOCK_N, num_warps, num_stages); a contraction over D runs in chunks of
# _CHUNK[size] columns (BLOCK_D = min(D_PAD, chunk)). Budget, H100 (227 KB shared memory,
# 64K 32-bit registers per SM; at most 255 per thread), one program, 16-bit inputs:
#   forward: resident acc [BLOCK_M, D_PAD] fp32, e.g. 64 x 512 x 4 = 128 KB = 128 regs/thread at
#     8 warps (what caps BLOCK_M at 64 for D 512); per key tile Q and K chunks (64 x 128 and
#     32 x 128 x 2 B = 24 KB) and V (32 x 512 x 2 B = 32 KB), x num_stages in flight
#   dK/dV: resident dK, dV [BLOCK_N, D_PAD] fp32 (32 x 512: 128 KB); per query tile Q and dO
#     [BLOCK_M, D_PAD] (2 x 32 KB) plus the K, Q, V, dO chunks of the two contractions
#   dQ: resident dQ [BLOCK_M, D_PAD] fp32 (32 x 512: 64 KB); per key tile K [BLOCK_N, D_PAD]
# fp32 dots run on FMA units (IEEE) or TF32, with fp32 operand tiles held in registers: hence
# the smaller tiles and 64-column chunks (no hoisted Q). Checked by compiling every kernel,
# dtype and D in {64, 80, 256, 320, 512} for sm_90a and sm_80 with Triton 3.8 and `ptxas -v`
# (no GPU at hand to time them): <= 80 KB of shared memory each; register spills only at
# D_PAD 512 (worst: the 16-bit forward, 255 registers + ~160 B/thread; BLOCK_M 32 would have
# none, at twice the K/V reads) and <= 40 B/thread elsewhere. benchmarks/bench_attention.py
# times them, and auto picks this kernel only where it measured faster (or for D > 256).
_FWD = {2: {32: (128, 64, 4, 3), 64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 64, 8, 2), 512: (64, 32, 8, 2)},
        4: {32: (64, 32, 8, 3), 64: (64, 32, 8, 3), 128: (64, 32, 8, 2), 256: (32, 16, 8, 2), 512: (32, 16, 8, 2)}}
_BWD_DKDV = {2: {32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (32, 64, 8, 2), 256: (32, 32, 8, 2), 512: (32, 32, 8, 2)},
             4: {32: (32, 32, 4, 2), 64: (32, 32, 4, 2), 128: (32, 16, 8, 2), 256: (32, 16, 8, 2), 512: (16, 16, 8, 2)}}
_BWD_DQ = {2: {32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (64, 32, 8, 2), 256: (64, 32, 8, 2), 512: (32, 32, 8, 2)},
           4: {32: (32, 32, 4, 2), 64: (32, 32, 4, 2), 128: (64, 16, 8, 2), 256: (32, 16, 8, 2), 512: (32, 16, 8, 2)}}
_CHUNK = {2: 128, 4: 64}  # columns of D per chunk of a contraction over the head dim
_DELTA_TILE = 8192  # elements of one delta-kernel tile


@triton.jit
def _load_tile(ptr, rows, cols, stride_r, stride_c, n_rows, n_cols):
    """ptr[rows[:, None], cols[None, :]] as a [R, C] tile in its own dtype, 0 outside (n_rows, n_cols)."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offs = rows[:, None].to(tl.int64) * stride_r + cols[None, :].to(tl.int64) * stride_c
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def _dot_t(a_ptr, a_rows, n_a, stride_ar, stride_ad, b_ptr, b_rows, n_b, stride_br, stride_bd, D,
           BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, D_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
           PRECISION: tl.constexpr):
    """A Bᵀ over the head dim, [BLOCK_A, BLOCK_B] fp32, in chunks of BLOCK_D columns read from memory."""
    acc = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
    for d0 in range(0, D_PAD, BLOCK_D):  # a loop, not unrolled: one chunk's tiles in flight at a time
        d = d0 + tl.arange(0, BLOCK_D)
        a = _load_tile(a_ptr, a_rows, d, stride_ar, stride_ad, n_a, D)
        b = _load_tile(b_ptr, b_rows, d, stride_br, stride_bd, n_b, D)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _valid(m, n, SEQ_Q, SEQ_K, CAUSAL: tl.constexpr):
    """Mask of the (query m, key n) pairs that exist and are not causally masked; m and n are
    broadcastable index tiles ([M, 1] and [1, N] for S, [1, M] and [N, 1] for Sᵀ)."""
    valid = (m < SEQ_Q) & (n < SEQ_K)
    if CAUSAL:
        valid = valid & (n <= m)
    return valid


@triton.jit
def _attention_fwd_kernel(
    q_ptr,    # (B, H, Sq, D) fp16/bf16/fp32, strides sq_*
    k_ptr,    # (B, H, Sk, D) q's dtype, strides sk_*
    v_ptr,    # (B, H, Sk, D) q's dtype, strides sv_*
    out_ptr,  # (B, H, Sq, D) out, q's dtype, contiguous
    lse_ptr,  # (B, H, Sq) out, fp32, contiguous: natural-log logsumexp of each row of scale * q kᵀ
    sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    H, SEQ_Q, SEQ_K, D, qk_scale,  # qk_scale = scale * log2(e)
    CAUSAL: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_ptr += b * sq_b + h * sq_h
    k_ptr += b * sk_b + h * sk_h
    v_ptr += b * sv_b + h * sv_h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)  # running row max of the scores (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    if D_PAD == BLOCK_D:
        q = _load_tile(q_ptr, offs_m, offs_d, sq_m, sq_d, SEQ_Q, D)
    hi = SEQ_K
    if CAUSAL:  # keys past the tile's last row are masked for every row: skip them
        hi = tl.minimum(SEQ_K, (pid_m + 1) * BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if D_PAD == BLOCK_D:
            k = _load_tile(k_ptr, offs_n, offs_d, sk_n, sk_d, SEQ_K, D)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        else:
            s = _dot_t(q_ptr, offs_m, SEQ_Q, sq_m, sq_d, k_ptr, offs_n, SEQ_K, sk_n, sk_d, D,
                       BLOCK_M, BLOCK_N, D_PAD, BLOCK_D, PRECISION)
        s = tl.where(_valid(offs_m[:, None], offs_n[None, :], SEQ_Q, SEQ_K, CAUSAL), s * qk_scale, -float("inf"))
        # key 0 is valid for every row (top-left causal), so the first tile makes m_new finite
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_new = tl.where(offs_m < SEQ_Q, m_new, 0.0)  # padding rows: keep exp2 finite
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptr, offs_n, offs_d, sv_n, sv_d, SEQ_K, D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    l_i = tl.where(offs_m < SEQ_Q, l_i, 1.0)
    out = acc / l_i[:, None]
    row = bh.to(tl.int64) * SEQ_Q + offs_m
    out_mask = (offs_m[:, None] < SEQ_Q) & (offs_d[None, :] < D)
    tl.store(out_ptr + row[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=out_mask)
    tl.store(lse_ptr + row, (m_i + tl.log2(l_i)) / 1.4426950408889634, mask=offs_m < SEQ_Q)


@triton.jit
def _attention_fwd_tma_kernel(
    q_desc, k_desc, v_desc,  # TMA descriptors of (B, H, S, D) q, k, v (16-bit), blocks [1, 1, BLOCK_M | BLOCK_N, D]
    out_ptr,  # (B, H, Sq, D) out, q's dtype, contiguous
    lse_ptr,  # (B, H, Sq) out, fp32, contiguous
    H, SEQ_Q, SEQ_K, qk_scale,
    CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """_attention_fwd_kernel with D == D_PAD == BLOCK_D, its tiles loaded by TMA (rows past S read as 0)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    q = q_desc.load([b, h, pid_m * BLOCK_M, 0]).reshape([BLOCK_M, D])
    hi = SEQ_K
    if CAUSAL:
        hi = tl.minimum(SEQ_K, (pid_m + 1) * BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = k_desc.load([b, h, n0, 0]).reshape([BLOCK_N, D])
        s = tl.dot(q, tl.trans(k))
        s = tl.where(_valid(offs_m[:, None], offs_n[None, :], SEQ_Q, SEQ_K, CAUSAL), s * qk_scale, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_new = tl.where(offs_m < SEQ_Q, m_new, 0.0)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = v_desc.load([b, h, n0, 0]).reshape([BLOCK_N, D])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    l_i = tl.where(offs_m < SEQ_Q, l_i, 1.0)
    out = acc / l_i[:, None]
    row = bh.to(tl.int64) * SEQ_Q + offs_m
    offs_d = tl.arange(0, D)
    tl.store(out_ptr + row[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=offs_m[:, None] < SEQ_Q)
    tl.store(lse_ptr + row, (m_i + tl.log2(l_i)) / 1.4426950408889634, mask=offs_m < SEQ_Q)


@triton.jit
def _attention_bwd_delta_kernel(
    out_ptr,    # (B, H, Sq, D) forward output, contiguous
    do_ptr,     # (B, H, Sq, D) grad of out, strides sdo_*
    delta_ptr,  # (B, H, Sq) out, fp32: rowsum(dO * O)
    sdo_b, sdo_h, sdo_m, sdo_d,
    H, SEQ_Q, D,
    D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    do_ptr += (bh // H).to(tl.int64) * sdo_b + (bh % H).to(tl.int64) * sdo_h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    o = _load_tile(out_ptr + bh.to(tl.int64) * SEQ_Q * D, offs_m, offs_d, D, 1, SEQ_Q, D).to(tl.float32)
    do = _load_tile(do_ptr, offs_m, offs_d, sdo_m, sdo_d, SEQ_Q, D).to(tl.float32)
    tl.store(delta_ptr + bh.to(tl.int64) * SEQ_Q + offs_m, tl.sum(o * do, 1), mask=offs_m < SEQ_Q)


@triton.jit
def _attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr,  # (B, H, S, D) forward inputs, strides sq_*, sk_*, sv_*
    do_ptr,     # (B, H, Sq, D) grad of out, strides sdo_*
    lse_ptr,    # (B, H, Sq) fp32 from the forward
    delta_ptr,  # (B, H, Sq) fp32 from the delta kernel
    dk_ptr,     # (B, H, Sk, D) out, k's dtype, contiguous
    dv_ptr,     # (B, H, Sk, D) out, v's dtype, contiguous
    sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, sdo_b, sdo_h, sdo_m, sdo_d,
    H, SEQ_Q, SEQ_K, D, scale, qk_scale,
    CAUSAL: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_ptr += b * sq_b + h * sq_h
    k_ptr += b * sk_b + h * sk_h
    v_ptr += b * sv_b + h * sv_h
    do_ptr += b * sdo_b + h * sdo_h
    lse_ptr += bh.to(tl.int64) * SEQ_Q
    delta_ptr += bh.to(tl.int64) * SEQ_Q
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    if D_PAD == BLOCK_D:
        k = _load_tile(k_ptr, offs_n, offs_d, sk_n, sk_d, SEQ_K, D)
        v = _load_tile(v_ptr, offs_n, offs_d, sv_n, sv_d, SEQ_K, D)
    lo = 0
    if CAUSAL:  # rows before this key tile see none of its keys: start at the tile holding row n0
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for m0 in range(lo, SEQ_Q, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q = _load_tile(q_ptr, offs_m, offs_d, sq_m, sq_d, SEQ_Q, D)
        do = _load_tile(do_ptr, offs_m, offs_d, sdo_m, sdo_d, SEQ_Q, D)
        lse2 = tl.load(lse_ptr + offs_m, mask=offs_m < SEQ_Q, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + offs_m, mask=offs_m < SEQ_Q, other=0.0)
        if D_PAD == BLOCK_D:
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        else:
            s_t = _dot_t(k_ptr, offs_n, SEQ_K, sk_n, sk_d, q_ptr, offs_m, SEQ_Q, sq_m, sq_d, D,
                         BLOCK_N, BLOCK_M, D_PAD, BLOCK_D, PRECISION)
            dp_t = _dot_t(v_ptr, offs_n, SEQ_K, sv_n, sv_d, do_ptr, offs_m, SEQ_Q, sdo_m, sdo_d, D,
                          BLOCK_N, BLOCK_M, D_PAD, BLOCK_D, PRECISION)
        valid_t = _valid(offs_m[None, :], offs_n[:, None], SEQ_Q, SEQ_K, CAUSAL)
        p_t = tl.where(valid_t, tl.exp2(s_t * qk_scale - lse2[None, :]), 0.0)  # Pᵀ [BLOCK_N, BLOCK_M]
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    row = bh.to(tl.int64) * SEQ_K + offs_n
    mask = (offs_n[:, None] < SEQ_K) & (offs_d[None, :] < D)
    offs = row[:, None] * D + offs_d[None, :]
    tl.store(dk_ptr + offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr,  # (B, H, S, D) forward inputs, strides sq_*, sk_*, sv_*
    do_ptr,     # (B, H, Sq, D) grad of out, strides sdo_*
    lse_ptr,    # (B, H, Sq) fp32 from the forward
    delta_ptr,  # (B, H, Sq) fp32 from the delta kernel
    dq_ptr,     # (B, H, Sq, D) out, q's dtype, contiguous
    sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, sdo_b, sdo_h, sdo_m, sdo_d,
    H, SEQ_Q, SEQ_K, D, scale, qk_scale,
    CAUSAL: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_ptr += b * sq_b + h * sq_h
    k_ptr += b * sk_b + h * sk_h
    v_ptr += b * sv_b + h * sv_h
    do_ptr += b * sdo_b + h * sdo_h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row = bh.to(tl.int64) * SEQ_Q + offs_m
    lse2 = tl.load(lse_ptr + row, mask=offs_m < SEQ_Q, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + row, mask=offs_m < SEQ_Q, other=0.0)
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    if D_PAD == BLOCK_D:
        q = _load_tile(q_ptr, offs_m, offs_d, sq_m, sq_d, SEQ_Q, D)
        do = _load_tile(do_ptr, offs_m, offs_d, sdo_m, sdo_d, SEQ_Q, D)
    hi = SEQ_K
    if CAUSAL:
        hi = tl.minimum(SEQ_K, (pid_m + 1) * BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_tile(k_ptr, offs_n, offs_d, sk_n, sk_d, SEQ_K, D)
        if D_PAD == BLOCK_D:
            v = _load_tile(v_ptr, offs_n, offs_d, sv_n, sv_d, SEQ_K, D)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        else:
            s = _dot_t(q_ptr, offs_m, SEQ_Q, sq_m, sq_d, k_ptr, offs_n, SEQ_K, sk_n, sk_d, D,
                       BLOCK_M, BLOCK_N, D_PAD, BLOCK_D, PRECISION)
            dp = _dot_t(do_ptr, offs_m, SEQ_Q, sdo_m, sdo_d, v_ptr, offs_n, SEQ_K, sv_n, sv_d, D,
                        BLOCK_M, BLOCK_N, D_PAD, BLOCK_D, PRECISION)
        valid = _valid(offs_m[:, None], offs_n[None, :], SEQ_Q, SEQ_K, CAUSAL)
        p = tl.where(valid, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    mask = (offs_m[:, None] < SEQ_Q) & (offs_d[None, :] < D)
    tl.store(dq_ptr + row[:, None] * D + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------
# Launchers: allocate, pick blocks, launch.
# ---------------------------------------------------------------------------
def _d_pad(d: int) -> int:
    return max(16, next_power_of_2(d))


def _blocks(table: dict, d: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch options for head dim d and dtype (see the budget above the tables)."""
    d_pad = _d_pad(d)
    size = 4 if dtype == torch.float32 else 2
    block_m, block_n, warps, stages = table[size][max(32, d_pad)]
    return dict(D_PAD=d_pad, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=min(d_pad, _CHUNK[size]),
                num_warps=warps, num_stages=stages)


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: for fp32, IEEE unless PyTorch's matmul precision allows TF32;
    fp16/bf16 dots are exact products with fp32 sums either way ("tf32" is Triton's default)."""
    return "ieee" if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest" else "tf32"


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                  blocks: dict | None = None):
    """-> (out (B, H, Sq, D) contiguous in q's dtype, lse (B, H, Sq) fp32). ``blocks`` overrides the table's
    BLOCK_M, BLOCK_N, BLOCK_D (capped at D_PAD), num_warps, num_stages, and TMA=True runs
    _attention_fwd_tma_kernel where ``tma_unsupported`` allows (benchmarks/probes/attention_fwd_sweep.py)."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    out = q.new_empty((B, H, Sq, D))
    lse = torch.empty((B, H, Sq), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    cfg = _blocks(_FWD, D, q.dtype)
    if blocks:
        cfg.update(blocks, BLOCK_D=min(cfg["D_PAD"], blocks.get("BLOCK_D", cfg["BLOCK_D"])))
    grid = (cdiv(Sq, cfg["BLOCK_M"]), B * H)
    if cfg.pop("TMA", False):
        if (why := tma_unsupported(q, k, v, cfg)) is not None:
            raise ValueError(f"attention_fwd: TMA=True: {why}")
        from triton.tools.tensor_descriptor import TensorDescriptor

        def desc(t, rows):
            return TensorDescriptor.from_tensor(t, [1, 1, rows, D])

        _attention_fwd_tma_kernel[grid](
            desc(q, cfg["BLOCK_M"]), desc(k, cfg["BLOCK_N"]), desc(v, cfg["BLOCK_N"]), out, lse, H, Sq, Sk,
            scale * LOG2E, CAUSAL=causal, D=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        return out, lse
    _attention_fwd_kernel[grid](q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(),
                                H, Sq, Sk, D, scale * LOG2E, CAUSAL=causal, PRECISION=_precision(q.dtype), **cfg)
    return out, lse


def tma_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: dict):
    """Why _attention_fwd_tma_kernel cannot run q, k, v with block sizes cfg (None when it can): TMA wants 16-bit
    elements here, the head dim a power of two held whole (D == D_PAD == BLOCK_D), 16-byte aligned bases and
    strides, and the head dim contiguous."""
    D = q.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"16-bit inputs only, got {q.dtype}"
    if D != cfg["D_PAD"] or cfg["BLOCK_D"] != D:
        return f"head dim {D} must be a power of two >= 16 held whole (D_PAD {cfg['D_PAD']}, BLOCK_D {cfg['BLOCK_D']})"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * t.element_size() % 16 for st in t.stride()[:-1]):
            return f"{name} needs a contiguous head dim and 16-byte aligned base and strides, got strides {t.stride()}"
    return None


def attention_bwd(grad_out, q, k, v, out, lse, causal: bool, scale: float):
    """-> (grad_q, grad_k, grad_v), contiguous, in the dtypes of q, k, v."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    dq, dk, dv = (t.new_empty(t.shape) for t in (q, k, v))
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    out, lse = out.contiguous(), lse.contiguous()
    delta = torch.empty_like(lse)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    precision = _precision(q.dtype)
    d_pad = _d_pad(D)
    rows = min(128, _DELTA_TILE // d_pad)  # two [rows, D_PAD] fp32 tiles: 64 registers/thread at 4 warps
    _attention_bwd_delta_kernel[(cdiv(Sq, rows), B * H)](
        out, grad_out, delta, *grad_out.stride(), H, Sq, D, D_PAD=d_pad, BLOCK_M=rows)
    cfg = _blocks(_BWD_DKDV, D, q.dtype)
    _attention_bwd_dkdv_kernel[(cdiv(Sk, cfg["BLOCK_N"]), B * H)](
        q, k, v, grad_out, lse, delta, dk, dv, *strides, H, Sq, Sk, D, scale, scale * LOG2E,
        CAUSAL=causal, PRECISION=precision, **cfg)
    cfg = _blocks(_BWD_DQ, D, q.dtype)
    _attention_bwd_dq_kernel[(cdiv(Sq, cfg["BLOCK_M"]), B * H)](
        q, k, v, grad_out, lse, delta, dq, *strides, H, Sq, Sk, D, scale, scale * LOG2E,
        CAUSAL=causal, PRECISION=precision, **cfg)
    return dq, dk, dv
