"""Counter-based Gaussian noise: the plain-PyTorch reference of the sampler ops' generator.

The noise of element ``e`` (flat, row-major index) of a step is a pure function of
``(seed, step, e)``, defined identically here, in csrc/philox.h (C++/CUDA) and in
kernels/philox.py (Triton)::

    tile = e // 1024, k = (e % 1024) // 256, j = e % 256, c = 256 * tile + j
    (r0, r1, r2, r3) = Philox4x32-10(counter=(c_lo, c_hi, step, 0), key=(seed_lo, seed_hi))
    u(r) = (2 * (r >> 9) + 1) / 2**24                     # exact in float32, in (0, 1)
    z[k] = sqrt(-2 ln u(r0)) * (cos, sin)(2 pi u(r1))     # k = 0, 1
           sqrt(-2 ln u(r2)) * (cos, sin)(2 pi u(r3))     # k = 2, 3

Philox4x32-10 is Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC'11), as in
Random123. Everything here runs on int64 tensors masked to 32 bits, so it works on any
device; the uniforms are exact and the normals are computed in float64.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["philox4x32_10_ref", "philox_uniforms_ref", "philox_normal_ref", "TILE_COUNTERS", "TILE_ELEMENTS"]

TILE_COUNTERS = 256  # Philox counters per noise tile
TILE_ELEMENTS = 4 * TILE_COUNTERS  # elements per noise tile (four normals per counter)
MASK32 = 0xFFFFFFFF
MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)  # Random123 PHILOX_M4x32_0, _1
WEYL = (0x9E3779B9, 0xBB67AE85)  # key increments


def _mulhilo(a: int, b: Tensor) -> Tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of a * b for a constant a and a uint32-valued int64 tensor b."""
    lo = (b * a) & MASK32  # int64 wraps; the low 32 bits are exact
    b_lo, b_hi = b & 0xFFFF, b >> 16
    hi = (b_hi * a + ((b_lo * a) >> 16)) >> 16  # floor(a * b / 2**32) without overflow
    return hi, lo


def philox4x32_10_ref(counter: Sequence, key: Sequence) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10: four counter words and two key words (ints or int64 tensors holding
    uint32 values, broadcast together) to four int64 tensors holding the uint32 outputs."""
    device = next((c.device for c in counter if isinstance(c, Tensor)), None)  # ints join the tensors' device
    # An int becomes a device fill, not a host-to-device copy (which would synchronise a GPU sampler).
    c0, c1, c2, c3 = ((c.to(torch.int64) if isinstance(c, Tensor) else torch.full((), int(c), dtype=torch.int64,
                                                                                  device=device)) & MASK32
                      for c in counter)
    k0, k1 = (int(k) & MASK32 for k in key)
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(10):
        hi0, lo0 = _mulhilo(MULTIPLIERS[0], c0)
        hi1, lo1 = _mulhilo(MULTIPLIERS[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + WEYL[0]) & MASK32, (k1 + WEYL[1]) & MASK32
    return c0, c1, c2, c3


def _check_seed_step(seed: int, step: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**32:
        raise ValueError(f"step must be an int in [0, 2**32), got {step!r}")


def _counters(first_tile: int, end: int, device) -> Tensor:
    tiles = -(-end // TILE_ELEMENTS) - first_tile
    return torch.arange(first_tile * TILE_COUNTERS, (first_tile + tiles) * TILE_COUNTERS, dtype=torch.int64,
                        device=device)


def philox_uniforms_ref(seed: int, step: int, numel: int, device=None, *, start: int = 0) -> Tensor:
    """(4, C) float64 uniforms u(r0..r3) of the C counters of the tiles that hold elements
    [start, start + numel), lane k of counter c going to element 1024 (c // 256) + 256 k + c % 256."""
    _check_seed_step(seed, step)
    c = _counters(start // TILE_ELEMENTS, start + numel, device)
    r = philox4x32_10_ref((c & MASK32, c >> 32, step, 0), (seed & MASK32, seed >> 32))
    return torch.stack([((x >> 9) * 2 + 1).double() * 2.0**-24 for x in r])


def philox_normal_ref(seed: int, step: int, numel: int, dtype: torch.dtype = torch.float64,
                      device: Optional[torch.device] = None, *, start: int = 0) -> Tensor:
    """The standard normals of elements [start, start + numel) of ``(seed, step)`` (module doc),
    computed in float64."""
    u0, u1, u2, u3 = philox_uniforms_ref(seed, step, numel, device, start=start)
    rad0, rad1 = torch.sqrt(-2.0 * torch.log(u0)), torch.sqrt(-2.0 * torch.log(u2))
    theta0, theta1 = 2.0 * math.pi * u1, 2.0 * math.pi * u3
    z = torch.stack([rad0 * torch.cos(theta0), rad0 * torch.sin(theta0),
                     rad1 * torch.cos(theta1), rad1 * torch.sin(theta1)])  # (4, C): lane k, counter c
    z = z.reshape(4, -1, TILE_COUNTERS) if z.numel() else z.new_empty(4, 0, TILE_COUNTERS)
    z = z.transpose(0, 1)  # (tiles, k, j): element 1024 tile + 256 k + j
    skip = start % TILE_ELEMENTS
    return z.reshape(-1)[skip:skip + numel].to(dtype)
