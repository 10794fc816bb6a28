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
import numbers

import torch
from torch import Tensor

from diffusion_fast import backends
from diffusion_fast.ops.philox import philox_normal_ref

__all__ = ["langevin_step", "langevin_step_ref"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
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
OPS = {"cuda": FN, "triton": FN + "_triton"}

for _name in OPS.values():
    backends.LIBRARY.define(_name + SCHEMA)


def _fake(x, score, alpha, alpha_value, noise, seed, step, add_noise):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


for _name in OPS.values():
    torch.library.register_fake(getattr(torch.ops.diffusion_fast, _name).default, _fake)
_OVERLOADS = {backend: getattr(torch.ops.diffusion_fast, name).default for backend, name in OPS.items()}


# ---------------------------------------------------------------------------
# Argument checks: every bad input gets a ValueError/TypeError naming the argument.
# ---------------------------------------------------------------------------
# Cheapest test first (exact types, no ABC isinstance): a sampling loop calls this per step, and
# at one small image the Python around the kernel costs more than the kernel.
def _check_float_tensor(name: str, t, x) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{FN}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{FN}: {name} must be a floating tensor ({', '.join(map(str, FLOAT_DTYPES))}), got {t.dtype}")
    if x is not None and t.device != x.device:
        raise ValueError(f"{FN}: {name} is on {t.device} but x is on {x.device}; move them to one device")


def _check_int(name: str, v, high: int) -> None:
    if type(v) is not int and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):  # a tensor would sync
        raise TypeError(f"{FN}: {name} must be an int, got {type(v).__name__}")
    if not 0 <= v < high:
        raise ValueError(f"{FN}: {name} must be in [0, {high}), got {v}")


def _check_inputs(x, score, step_size, seed, step, noise, add_noise) -> None:
    _check_float_tensor("x", x, None)
    _check_float_tensor("score", score, x)
    if score.shape != x.shape:
        raise ValueError(f"{FN}: score must have x's shape {tuple(x.shape)}, got {tuple(score.shape)}")
    if isinstance(step_size, Tensor):
        _check_float_tensor("step_size", step_size, x)
        if step_size.numel() != 1:
            raise ValueError(f"{FN}: step_size must be a number or a one-element tensor, got shape "
                             f"{tuple(step_size.shape)}")
    elif type(step_size) is not float and (isinstance(step_size, bool) or not isinstance(step_size, numbers.Real)):
        raise TypeError(f"{FN}: step_size must be a float or a one-element floating tensor, got "
                        f"{type(step_size).__name__}")
    elif not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"{FN}: step_size must be finite and > 0, got {step_size}")
    _check_int("seed", seed, 2**64)
    _check_int("step", step, 2**32)
    if add_noise is not True and add_noise is not False:
        raise TypeError(f"{FN}: add_noise must be a bool, got {type(add_noise).__name__}")
    if noise is not None:
        _check_float_tensor("noise", noise, x)
        if noise.shape != x.shape:
            raise ValueError(f"{FN}: noise must have x's shape {tuple(x.shape)}, got {tuple(noise.shape)}")
        if not add_noise:
            raise ValueError(f"{FN}: noise was given but add_noise=False would ignore it")


_unsupported = backends.unsupported  # every dtype on our extension, all but float64 on Triton
_selected: dict = {}  # (requested backend, device, dtype) -> backends.select's answer, which depends on nothing else


def _backend(x: Tensor) -> str:
    if torch.compiler.is_compiling():
        return backends.select(FN, x, _unsupported)
    key = (backends.current(), x.device, x.dtype)
    backend = _selected.get(key)
    if backend is None:
        backend = _selected[key] = backends.select(FN, x, _unsupported)
    return backend


def langevin_step(x: Tensor, score: Tensor, step_size: float | Tensor, *, seed: int = 0, step: int = 0,
                  noise: Tensor | None = None, add_noise: bool = True) -> Tensor:
    """One Langevin step x + alpha * score + sqrt(2 alpha) * z (module doc), fused into one kernel.

    ``x``, ``score``: one shape (B, ...), floating. ``step_size``: alpha > 0, a Python number or a
    one-element floating tensor on x's device (its value is not checked: that would sync).
    ``seed``: int in [0, 2**64); ``step``: int in [0, 2**32), the noise stream's step (a sampler's
    global step index). ``noise`` replaces the generated z; ``add_noise=False`` drops the noise
    term. Returns a contiguous tensor of x's shape and dtype. Not differentiable (sampling only).
    """
    _check_inputs(x, score, step_size, seed, step, noise, add_noise)
    seed, step = int(seed), int(step)  # numpy ints too (an int stays itself)
    backend = _backend(x)
    if backend == "torch":
        out = langevin_step_ref(x, score, step_size, seed=seed, step=step, noise=noise, add_noise=add_noise)
        return out.contiguous()  # as on the other backends
    if isinstance(step_size, Tensor):
        alpha, alpha_value = step_size.to(torch.float64 if x.dtype == torch.float64 else torch.float32).reshape(1), 0.0
    else:
        alpha, alpha_value = None, float(step_size)
    x = x.contiguous()
    score = _like_x(score, x)
    noise = None if noise is None else _like_x(noise, x)
    signed_seed = seed - 2**64 if seed >= 2**63 else seed  # the schema's int is an int64
    return _OVERLOADS[backend](x, score, alpha, alpha_value, noise, signed_seed, step, add_noise)


def _like_x(t: Tensor, x: Tensor) -> Tensor:
    return (t if t.dtype == x.dtype else t.to(x.dtype)).contiguous()


# The Triton twin runs kernels/langevin_step.py, imported on first use so that importing
# diffusion_fast never imports triton. CPU tensors reach it only under TRITON_INTERPRET=1.
def _triton_step(*args):
    from diffusion_fast.kernels import langevin_step as kernels

    return kernels.langevin_step(*args)


for _key in ("CPU", "CUDA"):
    backends.LIBRARY.impl(OPS["triton"], _triton_step, _key)
