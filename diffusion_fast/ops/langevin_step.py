"""Fused Langevin step ``langevin_step``: one pass over x and the score per step.

One step of (unadjusted) Langevin dynamics, the update of NCSN's annealed sampler
(Song & Ermon 2019, Algorithm 1; NCSNv2, Song & Ermon 2020)::

    out = x + alpha * score + sqrt(2 alpha) * z,   z ~ N(0, I)

with z generated inside the kernel from (seed, step, element index) by Philox4x32-10
(``diffusion_fast.ops.philox``; the element index is the flat row-major index of x), the
same stream as ``ddpm_step``/``ddim_step``, so every backend gives the same noise; or passed
as ``noise``; or left out (``add_noise=False``: out = x + alpha * score, NCSN's final
denoising step x + sigma_L^2 s(x, sigma_L)).

alpha (the step size) is a Python number or a one-element floating tensor on x's device that
the kernel reads from memory (no ``.item()``, no host sync), so a sampling loop can index a
device table of step sizes. x, score, noise: any shape and layout, float16/bfloat16/float32
(float64 on the CPU paths and the CUDA extension), math in float32 (float64 for float64).
The output is contiguous, in x's dtype. Sampling only: no autograd.

Backends: ``cuda`` (our extension: C++ on CPU tensors, CUDA on GPU tensors), ``triton`` and
``torch`` (``langevin_step_ref``), chosen per call by ``diffusion_fast.backends``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_fast import backends
from diffusion_fast.ops._noise_step import (FLOAT_DTYPE_SET, backend_selector, check_bool, check_float_tensor,
                                            check_int, check_scalar, define, like_x, overloads, scalar_arg,
                                            signed_seed)
from diffusion_fast.ops.philox import philox_normal_ref

__all__ = ["langevin_step", "langevin_step_ref"]

FN = "langevin_step"


# ---------------------------------------------------------------------------
# Reference (plain PyTorch).
# ---------------------------------------------------------------------------
def langevin_step_ref(x: Tensor, score: Tensor, step_size: float | Tensor, *, seed: int = 0, step: int = 0,
                      noise: Tensor | None = None, add_noise: bool = True, upcast: bool = True) -> Tensor:
    """Plain-PyTorch ``langevin_step``; ``upcast`` computes in float32 (or x's dtype if wider)."""
    compute = torch.promote_types(x.dtype, torch.float32) if upcast else x.dtype
    if isinstance(step_size, Tensor):
        alpha = step_size.to(device=x.device, dtype=compute).reshape(())  # 0-d tensor: no sync
        noise_scale = torch.sqrt(2.0 * alpha)
    else:
        alpha = float(step_size)
        noise_scale = math.sqrt(2.0 * alpha)
    out = x.to(compute) + alpha * score.to(compute)
    if add_noise:
        if noise is None:
            noise = philox_normal_ref(seed, step, x.numel(), compute, x.device).reshape(x.shape)
        out = out + noise_scale * noise.to(compute)
    return out.to(x.dtype)


# ---------------------------------------------------------------------------
# Op schemas, defined once: ``langevin_step`` is implemented in C++ (csrc/langevin_step, CPU and
# CUDA dispatch keys), ``langevin_step_triton`` by kernels/langevin_step.py. The step size is
# either the one-element tensor ``alpha`` (float32, float64 for float64 x; read on the device) or,
# when it is None, the number ``alpha_value``.
# ---------------------------------------------------------------------------
SCHEMA = ("(Tensor x, Tensor score, Tensor? alpha, float alpha_value, Tensor? noise, int seed, int step, "
          "bool add_noise) -> Tensor")


OPS = define(FN, SCHEMA, kernels="langevin_step", launcher="langevin_step")
_OVERLOADS = overloads(OPS)


# ---------------------------------------------------------------------------
# Argument checks: every bad input gets a ValueError/TypeError naming the argument.
# ---------------------------------------------------------------------------
def _check_inputs(x, score, step_size, seed, step, noise, add_noise) -> tuple:
    """Raise on bad input; else return (seed, step) as ints. The common call (x and score of one
    float dtype, device and shape; a float step size) passes a short test first: at one small
    image the checks are a fifth of the call."""
    if not (type(x) is Tensor and type(score) is Tensor and x.dtype in FLOAT_DTYPE_SET and score.device == x.device
            and score.shape == x.shape):
        check_float_tensor(FN, "x", x, None)
        check_float_tensor(FN, "score", score, x)
        if score.shape != x.shape:
            raise ValueError(f"{FN}: score must have x's shape {tuple(x.shape)}, got {tuple(score.shape)}")
    elif score.dtype not in FLOAT_DTYPE_SET:
        check_float_tensor(FN, "score", score, x)
    is_tensor = type(step_size) is not float and check_scalar(FN, "step_size", step_size, x)
    if not is_tensor and not 0.0 < step_size < math.inf:  # also False for NaN
        raise ValueError(f"{FN}: step_size must be finite and > 0, got {step_size}")
    seed, step = check_int(FN, "seed", seed, 2**64), check_int(FN, "step", step, 2**32)
    if add_noise is not True:
        check_bool(FN, "add_noise", add_noise)
    if noise is not None:
        check_float_tensor(FN, "noise", noise, x)
        if noise.shape != x.shape:
            raise ValueError(f"{FN}: noise must have x's shape {tuple(x.shape)}, got {tuple(noise.shape)}")
        if not add_noise:
            raise ValueError(f"{FN}: noise was given but add_noise=False would ignore it")
    return seed, step


_unsupported = backends.unsupported  # every dtype on our extension, all but float64 on Triton
_backend = backend_selector(FN, _unsupported)


def langevin_step(x: Tensor, score: Tensor, step_size: float | Tensor, *, seed: int = 0, step: int = 0,
                  noise: Tensor | None = None, add_noise: bool = True) -> Tensor:
    """One Langevin step x + alpha * score + sqrt(2 alpha) * z (module doc), fused into one kernel.

    ``x``, ``score``: one shape (B, ...), floating. ``step_size``: alpha > 0, a Python number or a
    one-element floating tensor on x's device (its value is not checked: that would sync).
    ``seed``: int in [0, 2**64); ``step``: int in [0, 2**32), the noise stream's step (a sampler's
    global step index). ``noise`` replaces the generated z; ``add_noise=False`` drops the noise
    term. Returns a contiguous tensor of x's shape and dtype. Not differentiable (sampling only).
    """
    seed, step = _check_inputs(x, score, step_size, seed, step, noise, add_noise)
    backend = _backend(x)
    if backend == "torch":
        out = langevin_step_ref(x, score, step_size, seed=seed, step=step, noise=noise, add_noise=add_noise)
        return out.contiguous()  # as on the other backends
    alpha, alpha_value = scalar_arg(step_size, x)
    x = x.contiguous()
    score = like_x(score, x)
    noise = None if noise is None else like_x(noise, x)
    return _OVERLOADS[backend](x, score, alpha, alpha_value, noise, signed_seed(seed), step, add_noise)
