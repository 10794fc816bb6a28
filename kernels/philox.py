"""Counter-based Gaussian noise in Triton: the generator of csrc/philox.h and
``diffusion_fast.ops.philox`` (definition there), with explicit uint32 arithmetic.

``tile_normals(tile, step, seed_lo, seed_hi, TILE)`` gives the four [TILE] blocks of normals of
one noise tile: block k holds elements 4 * TILE * tile + TILE * k + arange(TILE). TILE must be
256, the tile width of the definition. ``tile_run(tile, k, numel, z0, z1, z2, z3, TILE)`` gives
run k of the tile (offsets, mask, its normals): the loop of every kernel that draws noise
(sampler_steps, langevin_step, dpm2015_step) is

    z0, z1, z2, z3 = tile_normals(tile, step, seed_lo, seed_hi, TILE)   # when it draws noise
    for k in tl.static_range(4):
        offs, mask, z = tile_run(tile, k, numel, z0, z1, z2, z3, TILE)
        ...  # the op's epilogue on elements offs

with (numel, seed_lo, seed_hi, step) among its arguments, in that order. Its launcher starts with

    grid, scalars = noise_launch(op, x, seed, step, **tensors_read_with_x)

(the checks they share, one program per tile, those four scalars). The uniforms match the other
backends bit for bit; the normals to float rounding (tl.log, tl.sin, tl.cos are IEEE-accurate
libdevice calls on NVIDIA).
"""

import torch
import triton
import triton.language as tl

from diffusion_fast.kernels.launch import cdiv

__all__ = ["philox4x32_10", "tile_normals", "tile_run", "int32_bits", "noise_launch", "TILE_COUNTERS",
           "NOISE_NUM_WARPS"]

TILE_COUNTERS = 256
NOISE_NUM_WARPS = 2  # 64 threads: one 4-wide vector per thread per run of 256 (untuned: no GPU yet)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 blocks (c0..c3) with uint32 keys (k0, k1), as in Random123."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _numerator(r):
    """The odd N < 2**24 with u = N * 2**-24."""
    return ((r >> 9) << 1) | 1


@triton.jit
def _radius(r):
    """sqrt(-2 ln u(r)), float32."""
    u = _numerator(r).to(tl.float32) * 5.9604644775390625e-08
    return tl.sqrt_rn(-2.0 * tl.log(u))


@triton.jit
def _cos_sin_two_pi(r):
    """(cos, sin)(2 pi u(r)): 4u = q + f split exactly in integers, so |angle| <= pi / 4."""
    n = _numerator(r)
    q = (n + (1 << 21)) >> 22
    d = n.to(tl.int32, bitcast=True) - (q << 22).to(tl.int32, bitcast=True)
    angle = d.to(tl.float32) * 2.384185791015625e-07 * 1.5707963267948966
    s = tl.sin(angle)
    c = tl.cos(angle)
    quadrant = q & 3
    cos = tl.where(quadrant == 0, c, tl.where(quadrant == 1, -s, tl.where(quadrant == 2, -c, s)))
    sin = tl.where(quadrant == 0, s, tl.where(quadrant == 1, c, tl.where(quadrant == 2, -s, -c)))
    return cos, sin


@triton.jit
def tile_normals(tile, step, seed_lo, seed_hi, TILE: tl.constexpr):
    """Four [TILE] float32 blocks of normals of noise tile ``tile`` (int64 scalar).

    step, seed_lo, seed_hi: int32 scalars holding the uint32 step and the seed's halves.
    """
    counter = tile * TILE + tl.arange(0, TILE)  # int64
    c0 = counter.to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    zero = c0 * 0
    c2 = zero + step.to(tl.uint32, bitcast=True)
    k0 = seed_lo.to(tl.uint32, bitcast=True)
    k1 = seed_hi.to(tl.uint32, bitcast=True)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2, zero, k0, k1)
    rad0 = _radius(r0)
    rad1 = _radius(r2)
    cos0, sin0 = _cos_sin_two_pi(r1)
    cos1, sin1 = _cos_sin_two_pi(r3)
    return rad0 * cos0, rad0 * sin0, rad1 * cos1, rad1 * sin1


@triton.jit
def tile_run(tile, K: tl.constexpr, numel, z0, z1, z2, z3, TILE: tl.constexpr):
    """Run K (constexpr, 0..3) of noise tile ``tile``: its int64 offsets, their mask (< numel) and normals."""
    offs = tile * (4 * TILE) + K * TILE + tl.arange(0, TILE)
    if K == 0:
        z = z0
    elif K == 1:
        z = z1
    elif K == 2:
        z = z2
    else:
        z = z3
    return offs, offs < numel, z


def int32_bits(v: int) -> int:
    """The int32 with the bits of uint32 v mod 2**32 (how a kernel receives seed halves and steps)."""
    v &= 0xFFFFFFFF
    return v - 2**32 if v >= 2**31 else v


def noise_launch(op: str, x: torch.Tensor, seed: int, step: int, **like):
    """What every noise-tile launcher shares: raises TypeError unless x is float16, bfloat16 or
    float32, ValueError unless 0 <= step < 2**32 or unless each tensor of ``like`` (name=tensor, None
    allowed) is contiguous with x's shape, dtype and device (the kernel reads it element for element
    with x: a smaller one would be read past its end); messages name ``op``. Returns (grid, scalars):
    one program per noise tile of x.numel() elements (grid None when x is empty: nothing to launch)
    and the kernel's arguments (numel, seed_lo, seed_hi, step): the int32 bits of the seed (taken
    mod 2**64) and of the step."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{op} (triton): x must be float16, bfloat16 or float32, got {x.dtype}")
    if not 0 <= step < 2**32:
        raise ValueError(f"{op} (triton): step must be in [0, 2**32), got {step}")
    for name, t in like.items():
        if t is not None and (t.shape != x.shape or t.dtype != x.dtype or t.device != x.device
                              or not t.is_contiguous()):
            raise ValueError(f"{op} (triton): {name} must be contiguous with x's shape, dtype and device, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")
    numel = x.numel()
    grid = (cdiv(numel, 4 * TILE_COUNTERS),) if numel else None
    return grid, (numel, int32_bits(seed), int32_bits(seed >> 32), int32_bits(step))  # >> floors: two's complement
