"""Triton kernels of ``diffusion_fast.dwconv_bn_swish`` and ``bn_swish``; launchers only (math: ops/dwconv_bn_swish.py).

    z = sum_{i,j} w[c,i,j] * x[n,c,h+i-R,w+j-R] + cb[c]   (K = 1 without a weight: z = x, bn_swish)
    zhat = (z - mean[c]) * rstd[c];  zn = zhat * gamma[c] + beta[c] = sc[c] * z + sh[c];  y = swish(zn)
    backward: dzn = dy * swish'(zn);  A = sum dzn, B = sum dzn * zhat over (n, h, w) (= grad beta, gamma);
    dz = p * dzn + q * zhat + r with p = gamma * rstd and, training, q = -p B / M, r = -p A / M (eval 0);
    dx = sum_{i,j} w[c,i,j] * dz[h+R-i, w+R-j];  dw[c,i,j] = sum dz * x[h+i-R, w+j-R];  dcb = sum dz.

x, y, dy, dx: (N, C, H, W), NCHW-contiguous or channels-last (CHANNELS_LAST), addressed per sample by
_offsets. A program works on [BLOCK_C channels, BLOCK_S positions of one sample] tiles; the fast tile
axis is the contiguous one. The k x k conv is K*K masked, shifted loads of x (hits in L1/L2).
"Tiles" below number the (n, spatial block) pairs: TILES = N * cdiv(H * W, BLOCK_S).

Kernels and passes over memory (R, W: one read, one write of an x-sized tensor):
  forward   stats: grid (SPLIT, C blocks), each program walks TILES / SPLIT tiles, computes the conv and
            Chan-merges per-tile (count, mean, M2) per channel -> (SPLIT, C) partials (reads x: 1R);
            fwd: grid (TILES, C blocks), merges the partials, recomputes the conv, writes y (1R + 1W).
            Eval: the fwd kernel alone with the running statistics (1R + 1W).
  backward  reduce: grid (SPLIT, C blocks) -> per-split A, B (reads x, dy: 2R);
            dz: grid (TILES, C blocks), writes dz in fp32 (2R + 1W): dx needs dz at the k x k
            neighbours, which a tile cannot rebuild without recomputing k*k convs;
            dx: grid (SPLIT, C blocks), writes dx, per-split dw and dcb (2R + 1W).
Limits: x float16/bfloat16/float32 (float64 goes to another backend); all math in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffusion_fast.kernels.launch import cdiv, next_power_of_2, target_programs
from diffusion_fast.ops.group_norm_silu import _like_layout, is_channels_last

__all__ = ["dwconv_bn_swish_fwd", "dwconv_bn_swish_bwd", "bn_swish_fwd", "bn_swish_bwd"]

_TILE = 2048  # elements per [BLOCK_C, BLOCK_S] tile
_MAX_SPLIT = 128


@triton.jit
def _offsets(c, hh, ww, C, H, W, CHANNELS_LAST: tl.constexpr):
    """int64 offsets of the tile (c[:, None], (hh, ww)[None, :]) inside one sample."""
    if CHANNELS_LAST:
        offs = (hh * W + ww).to(tl.int64)[None, :] * C + c[:, None]
    else:
        offs = c[:, None].to(tl.int64) * (H * W) + (hh * W + ww)[None, :]
    return offs


@triton.jit
def _tile(t, cblock, C, H, W, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Tile t of channel block cblock: sample n, channels c (mask cm), rows h, columns w (mask sm)."""
    sb = tl.cdiv(H * W, BLOCK_S)
    n = t // sb
    s = (t % sb) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = cblock * BLOCK_C + tl.arange(0, BLOCK_C)
    return n, c, c < C, s // W, s % W, s < H * W


@triton.jit
def _load_vec(ptr, c, cm, HAS: tl.constexpr, DEFAULT: tl.constexpr):
    """ptr[c] as fp32, or DEFAULT when the optional input is absent."""
    if HAS:
        v = tl.load(ptr + c, mask=cm, other=DEFAULT).to(tl.float32)
    else:
        v = tl.zeros(c.shape, tl.float32) + DEFAULT
    return v


@triton.jit
def _conv(x_ptr, w_ptr, cb_ptr, c, cm, h, w, sm, C, H, W, K: tl.constexpr, HAS_WEIGHT: tl.constexpr,
          HAS_CONV_BIAS: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """z on the tile (fp32, [BLOCK_C, BLOCK_S]); x_ptr points at the sample. Zero padding via masks."""
    z = tl.zeros([c.shape[0], h.shape[0]], tl.float32)
    for i in tl.static_range(K):
        hh = h + (i - K // 2)
        hv = sm & (hh >= 0) & (hh < H)
        for j in tl.static_range(K):
            ww = w + (j - K // 2)
            m = cm[:, None] & (hv & (ww >= 0) & (ww < W))[None, :]
            xv = tl.load(x_ptr + _offsets(c, hh, ww, C, H, W, CHANNELS_LAST), mask=m, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                z += tl.load(w_ptr + c * (K * K) + (i * K + j), mask=cm, other=0.0).to(tl.float32)[:, None] * xv
            else:
                z += xv
    return z + _load_vec(cb_ptr, c, cm, HAS_CONV_BIAS, 0.0)[:, None]


@triton.jit
def _coefficients(mean_ptr, var_ptr, gamma_ptr, beta_ptr, c, cm, eps, HAS_GAMMA: tl.constexpr,
                  HAS_BETA: tl.constexpr):
    """[BLOCK_C] mean, rstd, sc = gamma * rstd, sh = beta - mean * sc."""
    mean = tl.load(mean_ptr + c, mask=cm, other=0.0)
    rstd = 1.0 / tl.sqrt(tl.load(var_ptr + c, mask=cm, other=1.0) + eps)
    sc = _load_vec(gamma_ptr, c, cm, HAS_GAMMA, 1.0) * rstd
    return mean, rstd, sc, _load_vec(beta_ptr, c, cm, HAS_BETA, 0.0) - mean * sc


@triton.jit
def _dzn(dy_ptr, offs, m, z, sc, sh, SWISH: tl.constexpr):
    """dzn = dy * swish'(sc z + sh) on the tile, 0 off-mask."""
    dzn = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if SWISH:
        zn = z * sc[:, None] + sh[:, None]
        sig = tl.sigmoid(zn)
        dzn = dzn * sig * (1.0 + zn * (1.0 - sig))
    return tl.where(m, dzn, 0.0)


@triton.jit
def _split_sum(part_ptr, c, cm, C, SPLIT, SPLIT_P2: tl.constexpr):
    """[BLOCK_C] sum over the SPLIT rows of a (SPLIT, C) fp32 partial."""
    j = tl.arange(0, SPLIT_P2)
    m = (j < SPLIT)[:, None] & cm[None, :]
    return tl.sum(tl.load(part_ptr + j[:, None] * C + c[None, :], mask=m, other=0.0), axis=0)


@triton.jit
def _dwconv_bn_swish_stats_kernel(
    x_ptr,          # (N, C, H, W) input, fp16/bf16/fp32, layout per CHANNELS_LAST
    w_ptr,          # (C, K*K) conv weight, any float dtype (a dummy when not HAS_WEIGHT)
    cb_ptr,         # (C,) conv bias (a dummy when not HAS_CONV_BIAS)
    part_mean_ptr,  # (SPLIT, C) fp32 out: mean of z over this split's tiles
    part_m2_ptr,    # (SPLIT, C) fp32 out: sum of squared deviations from that mean
    part_cnt_ptr,   # (SPLIT,) fp32 out: positions in this split
    C, H, W, TILES, T_PER,
    K: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    split = tl.program_id(0)
    cblock = tl.program_id(1)
    cnt = 0.0
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for t in range(split * T_PER, tl.minimum(split * T_PER + T_PER, TILES)):
        n, c, cm, h, w, sm = _tile(t, cblock, C, H, W, BLOCK_C, BLOCK_S)
        z = _conv(x_ptr + n.to(tl.int64) * C * H * W, w_ptr, cb_ptr, c, cm, h, w, sm, C, H, W, K, HAS_WEIGHT,
                  HAS_CONV_BIAS, CHANNELS_LAST)
        # Chan et al.: merge the tile's (count, mean, M2) into the running (cnt, mean, m2)
        t_cnt = tl.sum(sm.to(tl.float32))
        t_mean = tl.sum(tl.where(sm[None, :], z, 0.0), axis=1) / t_cnt
        d = tl.where(sm[None, :], z - t_mean[:, None], 0.0)
        new_cnt = cnt + t_cnt
        delta = t_mean - mean
        mean += delta * (t_cnt / new_cnt)
        m2 += tl.sum(d * d, axis=1) + delta * delta * (cnt * t_cnt / new_cnt)
        cnt = new_cnt
    c = cblock * BLOCK_C + tl.arange(0, BLOCK_C)
    tl.store(part_mean_ptr + split * C + c, mean, mask=c < C)
    tl.store(part_m2_ptr + split * C + c, m2, mask=c < C)
    tl.store(part_cnt_ptr + split, cnt, mask=cblock == 0)


@triton.jit
def _dwconv_bn_swish_fwd_kernel(
    x_ptr,          # (N, C, H, W) input, fp16/bf16/fp32, layout per CHANNELS_LAST
    y_ptr,          # (N, C, H, W) output, x's dtype and layout
    w_ptr,          # (C, K*K) conv weight (a dummy when not HAS_WEIGHT; same for the next three)
    cb_ptr,         # (C,) conv bias
    gamma_ptr,      # (C,) bn weight
    beta_ptr,       # (C,) bn bias
    part_mean_ptr,  # (SPLIT, C) fp32 from the stats kernel (TRAINING)
    part_m2_ptr,    # (SPLIT, C) fp32 from the stats kernel (TRAINING)
    part_cnt_ptr,   # (SPLIT,) fp32 from the stats kernel (TRAINING)
    mean_ptr,       # (C,) fp32: out when TRAINING (written by tile 0), else the running mean
    var_ptr,        # (C,) fp32: out when TRAINING (biased batch variance), else the running var
    C, H, W, SPLIT, eps,
    K: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr, TRAINING: tl.constexpr, SWISH: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT_P2: tl.constexpr,
):
    t = tl.program_id(0)
    cblock = tl.program_id(1)
    n, c, cm, h, w, sm = _tile(t, cblock, C, H, W, BLOCK_C, BLOCK_S)
    if TRAINING:  # merge the splits: mean = sum_j n_j mean_j / M, M2 = sum_j M2_j + n_j (mean_j - mean)^2
        j = tl.arange(0, SPLIT_P2)
        jm = j < SPLIT
        pm = jm[:, None] & cm[None, :]
        j_cnt = tl.load(part_cnt_ptr + j, mask=jm, other=0.0)[:, None]
        j_mean = tl.load(part_mean_ptr + j[:, None] * C + c[None, :], mask=pm, other=0.0)
        j_m2 = tl.load(part_m2_ptr + j[:, None] * C + c[None, :], mask=pm, other=0.0)
        total = tl.sum(j_cnt, axis=0)
        mean = tl.sum(j_cnt * j_mean, axis=0) / total
        var = tl.sum(j_m2 + j_cnt * (j_mean - mean[None, :]) * (j_mean - mean[None, :]), axis=0) / total
        first = cm & (c * 0 + t == 0)  # block-shaped: Triton 3.9's interpreter breaks block & scalar masks
        tl.store(mean_ptr + c, mean, mask=first)
        tl.store(var_ptr + c, var, mask=first)
    else:
        mean = tl.load(mean_ptr + c, mask=cm, other=0.0)
        var = tl.load(var_ptr + c, mask=cm, other=1.0)
    sc = _load_vec(gamma_ptr, c, cm, HAS_GAMMA, 1.0) / tl.sqrt(var + eps)
    sh = _load_vec(beta_ptr, c, cm, HAS_BETA, 0.0) - mean * sc
    base = n.to(tl.int64) * C * H * W
    z = _conv(x_ptr + base, w_ptr, cb_ptr, c, cm, h, w, sm, C, H, W, K, HAS_WEIGHT, HAS_CONV_BIAS, CHANNELS_LAST)
    zn = z * sc[:, None] + sh[:, None]
    if SWISH:
        zn = zn * tl.sigmoid(zn)
    m = cm[:, None] & sm[None, :]
    tl.store(y_ptr + base + _offsets(c, h, w, C, H, W, CHANNELS_LAST), zn.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _dwconv_bn_swish_bwd_reduce_kernel(
    dy_ptr,         # (N, C, H, W) upstream gradient, x's dtype and layout
    x_ptr,          # (N, C, H, W) forward input
    w_ptr,          # (C, K*K) conv weight (a dummy when not HAS_WEIGHT; same for the next three)
    cb_ptr,         # (C,) conv bias
    gamma_ptr,      # (C,) bn weight
    beta_ptr,       # (C,) bn bias
    mean_ptr,       # (C,) fp32 statistics y was normalised with
    var_ptr,        # (C,) fp32
    part_a_ptr,     # (SPLIT, C) fp32 out: sum dzn over this split's tiles
    part_b_ptr,     # (SPLIT, C) fp32 out: sum dzn * zhat
    C, H, W, TILES, T_PER, eps,
    K: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr, SWISH: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    split = tl.program_id(0)
    cblock = tl.program_id(1)
    c = cblock * BLOCK_C + tl.arange(0, BLOCK_C)
    mean, rstd, sc, sh = _coefficients(mean_ptr, var_ptr, gamma_ptr, beta_ptr, c, c < C, eps, HAS_GAMMA, HAS_BETA)
    acc_a = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    acc_b = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
    for t in range(split * T_PER, tl.minimum(split * T_PER + T_PER, TILES)):
        n, c, cm, h, w, sm = _tile(t, cblock, C, H, W, BLOCK_C, BLOCK_S)
        base = n.to(tl.int64) * C * H * W
        z = _conv(x_ptr + base, w_ptr, cb_ptr, c, cm, h, w, sm, C, H, W, K, HAS_WEIGHT, HAS_CONV_BIAS,
                  CHANNELS_LAST)
        dzn = _dzn(dy_ptr + base, _offsets(c, h, w, C, H, W, CHANNELS_LAST), cm[:, None] & sm[None, :], z, sc, sh,
                   SWISH)
        acc_a += dzn
        acc_b += dzn * ((z - mean[:, None]) * rstd[:, None])
    c = cblock * BLOCK_C + tl.arange(0, BLOCK_C)
    tl.store(part_a_ptr + split * C + c, tl.sum(acc_a, axis=1), mask=c < C)
    tl.store(part_b_ptr + split * C + c, tl.sum(acc_b, axis=1), mask=c < C)


@triton.jit
def _dwconv_bn_swish_bwd_dz_kernel(
    dy_ptr,         # (N, C, H, W) upstream gradient, x's dtype and layout
    x_ptr,          # (N, C, H, W) forward input
    dz_ptr,         # (N, C, H, W) fp32 out, x's layout: grad of z
    w_ptr,          # (C, K*K) conv weight (a dummy when not HAS_WEIGHT; same for the next three)
    cb_ptr,         # (C,) conv bias
    gamma_ptr,      # (C,) bn weight
    beta_ptr,       # (C,) bn bias
    mean_ptr,       # (C,) fp32 statistics y was normalised with
    var_ptr,        # (C,) fp32
    part_a_ptr,     # (SPLIT, C) fp32 from the reduce kernel
    part_b_ptr,     # (SPLIT, C) fp32 from the reduce kernel
    C, H, W, SPLIT, inv_m, eps,  # inv_m = 1 / (N * H * W)
    K: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr, TRAINING: tl.constexpr, SWISH: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, SPLIT_P2: tl.constexpr,
):
    t = tl.program_id(0)
    cblock = tl.program_id(1)
    n, c, cm, h, w, sm = _tile(t, cblock, C, H, W, BLOCK_C, BLOCK_S)
    mean, rstd, sc, sh = _coefficients(mean_ptr, var_ptr, gamma_ptr, beta_ptr, c, cm, eps, HAS_GAMMA, HAS_BETA)
    if TRAINING:  # batch statistics depend on every z: dz = p dzn + q zhat + r
        q = -sc * _split_sum(part_b_ptr, c, cm, C, SPLIT, SPLIT_P2) * inv_m
        r = -sc * _split_sum(part_a_ptr, c, cm, C, SPLIT, SPLIT_P2) * inv_m
    else:
        q = tl.zeros([BLOCK_C], tl.float32)
        r = tl.zeros([BLOCK_C], tl.float32)
    base = n.to(tl.int64) * C * H * W
    z = _conv(x_ptr + base, w_ptr, cb_ptr, c, cm, h, w, sm, C, H, W, K, HAS_WEIGHT, HAS_CONV_BIAS, CHANNELS_LAST)
    m = cm[:, None] & sm[None, :]
    offs = _offsets(c, h, w, C, H, W, CHANNELS_LAST)
    dzn = _dzn(dy_ptr + base, offs, m, z, sc, sh, SWISH)
    dz = sc[:, None] * dzn + q[:, None] * ((z - mean[:, None]) * rstd[:, None]) + r[:, None]
    tl.store(dz_ptr + base + offs, dz, mask=m)


@triton.jit
def _dwconv_bn_swish_bwd_dx_kernel(
    dz_ptr,         # (N, C, H, W) fp32 grad of z, x's layout
    x_ptr,          # (N, C, H, W) forward input
    dx_ptr,         # (N, C, H, W) out: grad of x, x's dtype and layout
    w_ptr,          # (C, K*K) conv weight (a dummy when not HAS_WEIGHT)
    part_w_ptr,     # (SPLIT, K*K, C) fp32 out: this split's sum dz * x[h+i-R, w+j-R] (when HAS_WEIGHT)
    part_cb_ptr,    # (SPLIT, C) fp32 out: this split's sum dz (when HAS_WEIGHT)
    C, H, W, TILES, T_PER,
    K: tl.constexpr, HAS_WEIGHT: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, KK_P2: tl.constexpr,
):
    split = tl.program_id(0)
    cblock = tl.program_id(1)
    taps = tl.arange(0, KK_P2)
    acc_w = tl.zeros([KK_P2, BLOCK_C], tl.float32)  # dw, tap-major; updated with one select per tap
    acc_cb = tl.zeros([BLOCK_C], tl.float32)
    for t in range(split * T_PER, tl.minimum(split * T_PER + T_PER, TILES)):
        n, c, cm, h, w, sm = _tile(t, cblock, C, H, W, BLOCK_C, BLOCK_S)
        base = n.to(tl.int64) * C * H * W
        m = cm[:, None] & sm[None, :]
        offs = _offsets(c, h, w, C, H, W, CHANNELS_LAST)
        if HAS_WEIGHT:
            dz = tl.load(dz_ptr + base + offs, mask=m, other=0.0)
            dx = tl.zeros([BLOCK_C, BLOCK_S], tl.float32)
            for i in tl.static_range(K):
                for j in tl.static_range(K):
                    wv = tl.load(w_ptr + c * (K * K) + (i * K + j), mask=cm, other=0.0).to(tl.float32)
                    # dx[h, w] += w[i, j] * dz[h + R - i, w + R - j]
                    hh = h + (K // 2 - i)
                    ww = w + (K // 2 - j)
                    mz = m & ((hh >= 0) & (hh < H) & (ww >= 0) & (ww < W))[None, :]
                    dx += wv[:, None] * tl.load(dz_ptr + base + _offsets(c, hh, ww, C, H, W, CHANNELS_LAST),
                                                mask=mz, other=0.0)
                    # dw[i, j] += dz[h, w] * x[h + i - R, w + j - R]
                    hx = h + (i - K // 2)
                    wx = w + (j - K // 2)
                    mx = m & ((hx >= 0) & (hx < H) & (wx >= 0) & (wx < W))[None, :]
                    xv = tl.load(x_ptr + base + _offsets(c, hx, wx, C, H, W, CHANNELS_LAST), mask=mx,
                                 other=0.0).to(tl.float32)
                    acc_w += tl.where(taps[:, None] == i * K + j, tl.sum(dz * xv, axis=1)[None, :], 0.0)
            acc_cb += tl.sum(dz, axis=1)
        else:  # bn_swish: dx = dz
            dx = tl.load(dz_ptr + base + offs, mask=m, other=0.0)
        tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
    if HAS_WEIGHT:
        c = cblock * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < C
        tl.store(part_w_ptr + (split * (K * K) + taps[:, None]) * C + c[None, :], acc_w,
                 mask=(taps[:, None] < K * K) & cm[None, :])
        tl.store(part_cb_ptr + split * C + c, acc_cb, mask=cm)


# ---------------------------------------------------------------------------
# Launchers: reshape, allocate, launch.
# ---------------------------------------------------------------------------
def _config(x: torch.Tensor, channels_last: bool) -> dict:
    """Tile shape, tiles and the split of the tiles for the reductions; heuristics, no autotuning."""
    N, C, H, W = x.shape
    hw = H * W
    if channels_last:  # channels are the contiguous axis
        block_c = min(next_power_of_2(C), 64)
        block_s = min(next_power_of_2(hw), max(1, _TILE // block_c))
    else:
        block_s = min(next_power_of_2(hw), 256)
        block_c = min(next_power_of_2(C), max(1, _TILE // block_s))
    cblocks = cdiv(C, block_c)
    tiles = N * cdiv(hw, block_s)
    split = max(1, min(cdiv(target_programs(x.device), cblocks), tiles, _MAX_SPLIT))
    t_per = cdiv(tiles, split)
    split = cdiv(tiles, t_per)  # no empty split
    return dict(CBLOCKS=cblocks, TILES=tiles, SPLIT=split, T_PER=t_per, BLOCK_C=block_c, BLOCK_S=block_s,
                CHANNELS_LAST=channels_last, num_warps=4 if block_c * block_s >= 1024 else 2)


def _layout(x: torch.Tensor):
    """x as NCHW-contiguous or channels-last, and whether to address it channels-last."""
    channels_last = is_channels_last(x)
    if not (channels_last or x.is_contiguous()):
        x = x.contiguous()
    return x, channels_last


def _fwd(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, training, eps, swish):
    """-> (y like x, mean (C,) fp32, var (C,) fp32)."""
    x, channels_last = _layout(x)
    _, C, H, W = x.shape
    y = torch.empty_like(x)
    if training:
        mean = torch.empty(C, device=x.device, dtype=torch.float32)
        var = torch.empty_like(mean)
    else:  # fresh copies: outputs never alias inputs
        mean = running_mean.to(torch.float32, copy=True)
        var = running_var.to(torch.float32, copy=True)
    cfg = _config(x, channels_last)
    k = 1 if conv_weight is None else conv_weight.shape[-1]
    w = x if conv_weight is None else conv_weight.reshape(C, k * k)
    opt = [x if t is None else t for t in (conv_bias, bn_weight, bn_bias)]
    has = dict(HAS_WEIGHT=conv_weight is not None, HAS_CONV_BIAS=conv_bias is not None)
    common = dict(C=C, H=H, W=W, K=k, CHANNELS_LAST=channels_last, BLOCK_C=cfg["BLOCK_C"], BLOCK_S=cfg["BLOCK_S"],
                  num_warps=cfg["num_warps"])
    split = cfg["SPLIT"] if training else 1
    parts = torch.empty((2, split, C), device=x.device, dtype=torch.float32)
    cnt = torch.empty(split, device=x.device, dtype=torch.float32)
    if training:
        _dwconv_bn_swish_stats_kernel[(split, cfg["CBLOCKS"])](
            x, w, opt[0], parts[0], parts[1], cnt, TILES=cfg["TILES"], T_PER=cfg["T_PER"], **has, **common)
    _dwconv_bn_swish_fwd_kernel[(cfg["TILES"], cfg["CBLOCKS"])](
        x, y, w, *opt, parts[0], parts[1], cnt, mean, var, SPLIT=split, eps=eps, HAS_GAMMA=bn_weight is not None,
        HAS_BETA=bn_bias is not None, TRAINING=training, SWISH=swish, SPLIT_P2=next_power_of_2(split),
        **has, **common)
    return y, mean, var


def _bwd(grad_y, x, conv_weight, conv_bias, bn_weight, bn_bias, mean, var, training, eps, swish):
    """-> (grad_x, grad_conv_weight, grad_conv_bias, grad_bn_weight, grad_bn_bias); absent inputs get (0,)."""
    x, channels_last = _layout(x)
    grad_y = _like_layout(grad_y, x)
    N, C, H, W = x.shape
    cfg = _config(x, channels_last)
    k = 1 if conv_weight is None else conv_weight.shape[-1]
    w = x if conv_weight is None else conv_weight.reshape(C, k * k)
    opt = [x if t is None else t for t in (conv_bias, bn_weight, bn_bias)]
    has = dict(HAS_WEIGHT=conv_weight is not None, HAS_CONV_BIAS=conv_bias is not None,
               HAS_GAMMA=bn_weight is not None, HAS_BETA=bn_bias is not None)
    common = dict(C=C, H=H, W=W, K=k, CHANNELS_LAST=channels_last, BLOCK_C=cfg["BLOCK_C"], BLOCK_S=cfg["BLOCK_S"],
                  num_warps=cfg["num_warps"])
    split, grid_split, grid_tiles = cfg["SPLIT"], (cfg["SPLIT"], cfg["CBLOCKS"]), (cfg["TILES"], cfg["CBLOCKS"])
    mean, var = mean.contiguous(), var.contiguous()
    sums = torch.empty((2, split, C), device=x.device, dtype=torch.float32)  # A, B per split
    _dwconv_bn_swish_bwd_reduce_kernel[grid_split](
        grad_y, x, w, *opt, mean, var, sums[0], sums[1], TILES=cfg["TILES"], T_PER=cfg["T_PER"], eps=eps,
        SWISH=swish, **has, **common)
    dz = torch.empty_like(x, dtype=torch.float32)
    _dwconv_bn_swish_bwd_dz_kernel[grid_tiles](
        grad_y, x, dz, w, *opt, mean, var, sums[0], sums[1], SPLIT=split, inv_m=1.0 / (N * H * W), eps=eps,
        TRAINING=training, SWISH=swish, SPLIT_P2=next_power_of_2(split), **has, **common)
    grad_x = torch.empty_like(x)
    part_w = torch.empty((split, k * k, C), device=x.device, dtype=torch.float32)
    part_cb = torch.empty((split, C), device=x.device, dtype=torch.float32)
    _dwconv_bn_swish_bwd_dx_kernel[grid_split](
        dz, x, grad_x, w, part_w, part_cb, TILES=cfg["TILES"], T_PER=cfg["T_PER"], HAS_WEIGHT=has["HAS_WEIGHT"],
        KK_P2=next_power_of_2(k * k), **common)
    sums = sums.sum(1)

    def grad(t, g):  # a fresh contiguous tensor: no view of sums or of part_w's transpose
        return x.new_empty((0,)) if t is None else g.reshape(t.shape).to(
            t.dtype, copy=True, memory_format=torch.contiguous_format)

    return (grad_x, grad(conv_weight, part_w.sum(0).t()), grad(conv_bias, part_cb.sum(0)), grad(bn_weight, sums[1]),
            grad(bn_bias, sums[0]))


def dwconv_bn_swish_fwd(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, training: bool,
                        eps: float, swish: bool, needs_grad: bool):  # needs_grad: a CPU-only hint, unused here
    return _fwd(x, conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, training, eps, swish)


def dwconv_bn_swish_bwd(grad_y, x, conv_weight, conv_bias, bn_weight, bn_bias, mean, var, training: bool, eps: float,
                        swish: bool):
    return _bwd(grad_y, x, conv_weight, conv_bias, bn_weight, bn_bias, mean, var, training, eps, swish)


def bn_swish_fwd(x, bn_weight, bn_bias, running_mean, running_var, training: bool, eps: float, swish: bool,
                 needs_grad: bool):
    return _fwd(x, None, None, bn_weight, bn_bias, running_mean, running_var, training, eps, swish)


def bn_swish_bwd(grad_y, x, bn_weight, bn_bias, mean, var, training: bool, eps: float, swish: bool):
    grads = _bwd(grad_y, x, None, None, bn_weight, bn_bias, mean, var, training, eps, swish)
    return grads[0], grads[3], grads[4]
