"""Triton kernel of the fused sampler steps (``diffusion_fast.ddpm_step``/``ddim_step``); launcher only.

    x0 = a * x - b * eps;  x0 = clamp(x0, -clip, clip) (CLIP);  out = c1 * x0 + c2 * x + c3 * eps + sigma * z

coef = (a, b, c1, c2, c3, sigma), float32 (6,) on the device. z: kernels/philox.py, or a given
noise tensor. One program per noise tile: 1024 elements in four contiguous runs of 256, the four
normals of each Philox counter going one to each run. Per element: reads x, eps (and noise),
writes out (and x0), so 12-20 bytes in fp32. Limits: float16/bfloat16/float32 (float64 goes to
another backend); math in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from diffusion_fast.kernels.philox import NOISE_NUM_WARPS, TILE_COUNTERS, noise_launch, tile_normals, tile_run

__all__ = ["sampler_step"]


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "step"])
def _sampler_step_kernel(
    x_ptr,  # x_t: (numel,) contiguous, fp16/bf16/fp32
    eps_ptr,  # eps: (numel,), x's dtype
    noise_ptr,  # z override: (numel,), x's dtype; any valid pointer unless HAS_NOISE
    out_ptr,  # x_prev: (numel,), x's dtype
    x0_ptr,  # predicted x0: (numel,), x's dtype; written only when WRITE_X0
    coef_ptr,  # (6,) float32: a, b, c1, c2, c3, sigma
    numel,
    seed_lo,  # int32 bits of the seed's low 32 bits
    seed_hi,  # int32 bits of the seed's high 32 bits
    step,  # int32 bits of the uint32 noise stream step
    clip,  # float: |x0| bound when CLIP
    CLIP: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    WRITE_X0: tl.constexpr,
    TILE: tl.constexpr,  # 256 (the noise definition's tile width)
):
    tile = tl.program_id(0).to(tl.int64)
    a = tl.load(coef_ptr + 0)
    b = tl.load(coef_ptr + 1)
    c1 = tl.load(coef_ptr + 2)
    c2 = tl.load(coef_ptr + 3)
    c3 = tl.load(coef_ptr + 4)
    sigma = tl.load(coef_ptr + 5)
    zero = tl.zeros([TILE], tl.float32)
    z0, z1, z2, z3 = zero, zero, zero, zero
    if not HAS_NOISE:
        if sigma != 0.0:  # t = 0 of DDPM, eta = 0 of DDIM: no noise to make
            z0, z1, z2, z3 = tile_normals(tile, step, seed_lo, seed_hi, TILE)
    for k in tl.static_range(4):
        offs, mask, z = tile_run(tile, k, numel, z0, z1, z2, z3, TILE)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        e = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x0 = a * x - b * e
        if CLIP:
            x0 = tl.minimum(tl.maximum(x0, -clip), clip)
        if HAS_NOISE:
            z = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out = c1 * x0 + c2 * x + c3 * e + sigma * z
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
        if WRITE_X0:
            tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def sampler_step(x, eps, coef, noise, seed, step, clip, return_x0):
    """Launch for contiguous x, eps (and noise) of one dtype and a (6,) float32 coef on their device."""
    grid, scalars = noise_launch("sampler_step", x, seed, step, eps=eps, noise=noise)
    if coef.dtype != torch.float32 or coef.shape != (6,):
        raise ValueError(f"sampler_step (triton): coef must be a (6,) float32 tensor, got {tuple(coef.shape)} "
                         f"{coef.dtype}")
    out = torch.empty_like(x)
    x0 = torch.empty_like(x) if return_x0 else x.new_empty((0,))
    if grid is None:
        return out, x0
    _sampler_step_kernel[grid](
        x, eps, x if noise is None else noise, out, x0 if return_x0 else out, coef.contiguous(), *scalars,
        0.0 if clip is None else float(clip),
        CLIP=clip is not None, HAS_NOISE=noise is not None, WRITE_X0=return_x0, TILE=TILE_COUNTERS,
        num_warps=NOISE_NUM_WARPS,
    )
    return out, x0
