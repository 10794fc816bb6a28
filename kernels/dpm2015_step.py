"""Triton kernel of the fused 2015 reverse step (``diffusion_fast.dpm2015_step``); launcher only.

    x_prev = sqrt(1 - beta) x + sqrt(beta) z_mu + rsqrt(1 + exp(-(z_sigma + logit beta))) z
           = mu + sqrt(sigmoid(z_sigma + logit beta)) z          (z term only when NOISE)

beta: read from a (1,) float32 tensor on the device (BETA_PTR) or passed as a number; its square
roots and logit are formed once per program. z: kernels/philox.py. One program per noise tile:
1024 elements in four contiguous runs of 256, the four normals of each Philox counter going one
to each run. Per element: reads x, z_mu, z_sigma, writes x_prev, so 16 bytes in fp32.
Limits: float16/bfloat16/float32 (float64 goes to another backend); math in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffusion_fast.kernels.philox import NOISE_NUM_WARPS, TILE_COUNTERS, noise_launch, tile_normals, tile_run

__all__ = ["dpm2015_step"]


@triton.jit(do_not_specialize=["beta_value", "seed_lo", "seed_hi", "step"])
def _dpm2015_step_kernel(
    x_ptr,  # x^t: (numel,) contiguous, fp16/bf16/fp32
    z_mu_ptr,  # network mean output: (numel,), x's dtype
    z_sigma_ptr,  # network variance output: (numel,), x's dtype
    out_ptr,  # x^(t-1): (numel,), x's dtype
    beta_ptr,  # beta_t: (1,) float32; any valid pointer unless BETA_PTR
    beta_value,  # float: beta_t when not BETA_PTR
    numel,
    seed_lo,  # int32 bits of the seed's low 32 bits
    seed_hi,  # int32 bits of the seed's high 32 bits
    step,  # int32 bits of the uint32 noise stream step
    BETA_PTR: tl.constexpr,
    NOISE: tl.constexpr,  # add the Philox noise term
    TILE: tl.constexpr,  # 256 (the noise definition's tile width)
):
    tile = tl.program_id(0).to(tl.int64)
    zero = tl.zeros([TILE], tl.float32)
    if BETA_PTR:
        beta = zero + tl.load(beta_ptr).to(tl.float32)
    else:
        beta = zero + beta_value  # a [TILE] block: a scalar float argument is a Python float when interpreted
    sqrt_keep = tl.sqrt(1.0 - beta)
    sqrt_beta = tl.sqrt(beta)
    logit_beta = tl.log(beta) - tl.log(1.0 - beta)
    z0, z1, z2, z3 = zero, zero, zero, zero
    if NOISE:
        z0, z1, z2, z3 = tile_normals(tile, step, seed_lo, seed_hi, TILE)
    for k in tl.static_range(4):
        offs, mask, z = tile_run(tile, k, numel, z0, z1, z2, z3, TILE)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z_mu = tl.load(z_mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = sqrt_keep * x + sqrt_beta * z_mu
        if NOISE:
            z_sigma = tl.load(z_sigma_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            std = 1.0 / tl.sqrt(1.0 + tl.exp(-(z_sigma + logit_beta)))  # sqrt(sigmoid(.)); 0 when exp overflows
            out += std * z
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def dpm2015_step(x, z_mu, z_sigma, beta, beta_value, seed, step, add_noise):
    """Launch for contiguous x, z_mu, z_sigma of one dtype; beta: (1,) float32 on their device or None."""
    grid, scalars = noise_launch("dpm2015_step", x, seed, step, z_mu=z_mu, z_sigma=z_sigma)
    if beta is not None and (beta.dtype != torch.float32 or beta.numel() != 1):
        raise ValueError(f"dpm2015_step (triton): beta must be a (1,) float32 tensor, got "
                         f"{tuple(beta.shape)} {beta.dtype}")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if grid is None:
        return out
    _dpm2015_step_kernel[grid](
        x, z_mu, z_sigma, out, x if beta is None else beta, float(beta_value), *scalars,
        BETA_PTR=beta is not None, NOISE=add_noise, TILE=TILE_COUNTERS, num_warps=NOISE_NUM_WARPS,
    )
    return out
