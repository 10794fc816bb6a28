"""Triton kernel of the fused Langevin step (``diffusion_fast.langevin_step``); launcher only.

    out = x + alpha * score + sqrt(2 alpha) * z        (z term only when NOISE != 0)

alpha: read from a (1,) float32 tensor on the device (ALPHA_PTR) or passed as a number. z:
kernels/philox.py (NOISE = 1), or a given noise tensor (NOISE = 2). One program per noise tile:
1024 elements in four contiguous runs of 256, the four normals of each Philox counter going one
to each run. Per element: reads x, score (and noise), writes out, so 12-16 bytes in fp32.
Limits: float16/bfloat16/float32 (float64 goes to another backend); math in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffusion_fast.kernels.philox import NOISE_NUM_WARPS, TILE_COUNTERS, noise_launch, tile_normals, tile_run

__all__ = ["langevin_step"]

NO_NOISE, PHILOX, GIVEN = 0, 1, 2


@triton.jit(do_not_specialize=["alpha_value", "seed_lo", "seed_hi", "step"])
def _langevin_step_kernel(
    x_ptr,  # x: (numel,) contiguous, fp16/bf16/fp32
    score_ptr,  # score: (numel,), x's dtype
    noise_ptr,  # z override: (numel,), x's dtype; any valid pointer unless NOISE == 2
    out_ptr,  # out: (numel,), x's dtype
    alpha_ptr,  # step size: (1,) float32; any valid pointer unless ALPHA_PTR
    alpha_value,  # float: the step size when not ALPHA_PTR
    numel,
    seed_lo,  # int32 bits of the seed's low 32 bits
    seed_hi,  # int32 bits of the seed's high 32 bits
    step,  # int32 bits of the uint32 noise stream step
    ALPHA_PTR: tl.constexpr,
    NOISE: tl.constexpr,  # 0: none, 1: Philox, 2: given
    TILE: tl.constexpr,  # 256 (the noise definition's tile width)
):
    tile = tl.program_id(0).to(tl.int64)
    zero = tl.zeros([TILE], tl.float32)
    if ALPHA_PTR:
        alpha = zero + tl.load(alpha_ptr).to(tl.float32)
    else:
        alpha = zero + alpha_value  # a [TILE] block: a scalar float argument is a Python float when interpreted
    noise_scale = tl.sqrt(2.0 * alpha)
    z0, z1, z2, z3 = zero, zero, zero, zero
    if NOISE == 1:
        z0, z1, z2, z3 = tile_normals(tile, step, seed_lo, seed_hi, TILE)
    for k in tl.static_range(4):
        offs, mask, z = tile_run(tile, k, numel, z0, z1, z2, z3, TILE)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(score_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = x + alpha * s
        if NOISE == 1:
            out += noise_scale * z
        elif NOISE == 2:
            out += noise_scale * tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def langevin_step(x, score, alpha, alpha_value, noise, seed, step, add_noise):
    """Launch for contiguous x, score (and noise) of one dtype; alpha: (1,) float32 on their device or None."""
    grid, scalars = noise_launch("langevin_step", x, seed, step, score=score, noise=noise)
    if alpha is not None and (alpha.dtype != torch.float32 or alpha.numel() != 1):
        raise ValueError(f"langevin_step (triton): alpha must be a (1,) float32 tensor, got "
                         f"{tuple(alpha.shape)} {alpha.dtype}")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if grid is None:
        return out
    noise_kind = NO_NOISE if not add_noise else (PHILOX if noise is None else GIVEN)
    _langevin_step_kernel[grid](
        x, score, x if noise is None else noise, out, x if alpha is None else alpha, float(alpha_value), *scalars,
        ALPHA_PTR=alpha is not None, NOISE=noise_kind, TILE=TILE_COUNTERS, num_warps=NOISE_NUM_WARPS,
    )
    return out
