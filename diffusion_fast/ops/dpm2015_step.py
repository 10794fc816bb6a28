"""Fused reverse step ``dpm2015_step`` of Sohl-Dickstein et al. 2015: one pass over x, z_mu, z_sigma.

The Gaussian reverse kernel of "Deep Unsupervised Learning using Nonequilibrium Thermodynamics"
(Sec. 2.2, App. D.1; the official ``get_mu_sigma``), sampled in one step, per element::

    mu     = sqrt(1 - beta) * x + sqrt(beta) * z_mu
    Sigma  = sigmoid(z_sigma + logit(beta))
    x_prev = mu + sqrt(Sigma) * z,    z ~ N(0, I)

(z_mu, z_sigma) are the network's outputs at (x^t, t) and beta = beta_t. z is generated inside
the kernel from (seed, step, element index) by Philox4x32-10 (``diffusion_fast.ops.philox``; the
element index is the flat row-major index of x), the stream of ``philox_normal_ref`` and of the
other sampler ops, so every backend gives the same noise. ``add_noise=False`` returns mu.

beta is a Python number in (0, 1) or a one-element floating tensor on x's device that the kernel
reads from memory (no ``.item()``, no host sync), e.g. a row of a device table of betas. x,
z_mu, z_sigma: one shape, any layout; float16/bfloat16/float32 (float64 on the CPU paths and the
CUDA extension); z_mu and z_sigma are cast to x's dtype; math in float32 (float64 for float64).
The output is contiguous, in x's dtype. Sampling only: the kernels have no backward (calling one
raises).

Backends: ``cuda`` (our extension: C++ on CPU tensors, CUDA on GPU tensors), ``triton`` and
``torch`` (``dpm2015_step_ref``), chosen per call by ``diffusion_fast.backends``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_fast import backends
from diffusion_fast.ops._noise_step import (backend_selector, check_bool, check_float_tensor, check_int, check_scalar,
                                            define, like_x, overloads, scalar_arg, signed_seed)
from diffusion_fast.ops.philox import philox_normal_ref

__all__ = ["dpm2015_step", "dpm2015_step_ref"]

FN = "dpm2015_step"


# ---------------------------------------------------------------------------
# Reference (plain PyTorch).
# ---------------------------------------------------------------------------
def dpm2015_step_ref(x: Tensor, z_mu: Tensor, z_sigma: Tensor, beta: float | Tensor, *, seed: int = 0,
                     step: int = 0, add_noise: bool = True, upcast: bool = True) -> Tensor:
    """Plain-PyTorch ``dpm2015_step``; ``upcast`` computes in float32 (or x's dtype if wider)."""
    compute = torch.promote_types(x.dtype, torch.float32) if upcast else x.dtype
    if isinstance(beta, Tensor):
        b = beta.to(device=x.device, dtype=compute).reshape(())  # 0-d tensor: no sync
        sqrt_keep, sqrt_beta, logit_beta = (1.0 - b).sqrt(), b.sqrt(), torch.logit(b)
    else:
        b = float(beta)
        sqrt_keep, sqrt_beta, logit_beta = math.sqrt(1.0 - b), math.sqrt(b), math.log(b) - math.log1p(-b)
    out = sqrt_keep * x.to(compute) + sqrt_beta * z_mu.to(compute)
    if add_noise:
        var = torch.sigmoid(z_sigma.to(compute) + logit_beta)
        out = out + var.sqrt() * philox_normal_ref(seed, step, x.numel(), compute, x.device).reshape(x.shape)
    return out.to(x.dtype)


# ---------------------------------------------------------------------------
# Op schemas, defined once: ``dpm2015_step`` is implemented in C++ (csrc/dpm2015_step, CPU and CUDA
# dispatch keys), ``dpm2015_step_triton`` by kernels/dpm2015_step.py. beta is either the one-element
# tensor ``beta`` (float32, float64 for float64 x; read on the device) or, when it is None, the
# number ``beta_value``.
# ---------------------------------------------------------------------------
SCHEMA = ("(Tensor x, Tensor z_mu, Tensor z_sigma, Tensor? beta, float beta_value, int seed, int step, "
          "bool add_noise) -> Tensor")


OPS = define(FN, SCHEMA, kernels="dpm2015_step", launcher="dpm2015_step", no_backward=True)
_OVERLOADS = overloads(OPS)


# ---------------------------------------------------------------------------
# Argument checks: every bad input gets a ValueError/TypeError naming the argument.
# ---------------------------------------------------------------------------
def _check_inputs(x, z_mu, z_sigma, beta, seed, step, add_noise) -> tuple:
    """Raise on bad input; else return (seed, step) as ints."""
    check_float_tensor(FN, "x", x, None)
    for name, t in (("z_mu", z_mu), ("z_sigma", z_sigma)):
        check_float_tensor(FN, name, t, x)
        if t.shape != x.shape:
            raise ValueError(f"{FN}: {name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if not check_scalar(FN, "beta", beta, x) and not 0.0 < beta < 1.0:  # NaN fails too
        raise ValueError(f"{FN}: beta must be in (0, 1), got {beta}")
    seed, step = check_int(FN, "seed", seed, 2**64), check_int(FN, "step", step, 2**32)
    check_bool(FN, "add_noise", add_noise)
    return seed, step


_unsupported = backends.unsupported  # every dtype on our extension, all but float64 on Triton
_backend = backend_selector(FN, _unsupported)


def dpm2015_step(x: Tensor, z_mu: Tensor, z_sigma: Tensor, beta: float | Tensor, *, seed: int = 0, step: int = 0,
                 add_noise: bool = True) -> Tensor:
    """One reverse step x^t -> x^(t-1) of Sohl-Dickstein et al. 2015 (module doc), fused into one kernel.

    ``x``: x^t, any shape, e.g. (N, D); ``z_mu``, ``z_sigma``: the network's outputs at (x^t, t),
    x's shape. ``beta``: beta_t in (0, 1), a Python number or a one-element floating tensor on x's
    device (its value is not checked: that would sync). ``seed``: int in [0, 2**64); ``step``: int
    in [0, 2**32), the noise stream's step (``DiffusionProcess2015.sample`` uses t - 1).
    ``add_noise=False`` returns the mean mu. Returns a contiguous tensor of x's shape and dtype.
    Not differentiable on our kernels (sampling only).
    """
    seed, step = _check_inputs(x, z_mu, z_sigma, beta, seed, step, add_noise)
    backend = _backend(x)
    if backend == "torch":
        return dpm2015_step_ref(x, z_mu, z_sigma, beta, seed=seed, step=step, add_noise=add_noise).contiguous()
    beta_t, beta_value = scalar_arg(beta, x)
    x = x.contiguous()
    z_mu, z_sigma = like_x(z_mu, x), like_x(z_sigma, x)
    return _OVERLOADS[backend](x, z_mu, z_sigma, beta_t, beta_value, signed_seed(seed), step, add_noise)
