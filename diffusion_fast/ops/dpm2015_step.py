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
import numbers

import torch
from torch import Tensor

from diffusion_fast import backends
from diffusion_fast.ops.philox import philox_normal_ref

__all__ = ["dpm2015_step", "dpm2015_step_ref"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
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
OPS = {"cuda": FN, "triton": FN + "_triton"}

for _name in OPS.values():
    backends.LIBRARY.define(_name + SCHEMA)


def _fake(x, z_mu, z_sigma, beta, beta_value, seed, step, add_noise):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    pass


def _backward(ctx, grad):
    raise NotImplementedError(f"{FN} is a sampling op and has no backward; use dpm2015_step_ref to differentiate")


for _name in OPS.values():
    _op = getattr(torch.ops.diffusion_fast, _name).default
    torch.library.register_fake(_op, _fake)
    torch.library.register_autograd(_op, _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------
# Argument checks: every bad input gets a ValueError/TypeError naming the argument.
# ---------------------------------------------------------------------------
def _check_float_tensor(name: str, t, x) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{FN}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{FN}: {name} must be a floating tensor ({', '.join(map(str, FLOAT_DTYPES))}), got {t.dtype}")
    if x is not None and t.device != x.device:
        raise ValueError(f"{FN}: {name} is on {t.device} but x is on {x.device}; move them to one device")


def _check_int(name: str, v, high: int) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):  # a tensor would need a host sync: refused
        raise TypeError(f"{FN}: {name} must be an int, got {type(v).__name__}")
    if not 0 <= v < high:
        raise ValueError(f"{FN}: {name} must be in [0, {high}), got {v}")


def _check_inputs(x, z_mu, z_sigma, beta, seed, step, add_noise) -> None:
    _check_float_tensor("x", x, None)
    for name, t in (("z_mu", z_mu), ("z_sigma", z_sigma)):
        _check_float_tensor(name, t, x)
        if t.shape != x.shape:
            raise ValueError(f"{FN}: {name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if isinstance(beta, Tensor):
        _check_float_tensor("beta", beta, x)
        if beta.numel() != 1:
            raise ValueError(f"{FN}: beta must be a number or a one-element tensor, got shape {tuple(beta.shape)}")
    elif isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"{FN}: beta must be a float or a one-element floating tensor, got {type(beta).__name__}")
    elif not 0.0 < beta < 1.0:  # NaN fails too
        raise ValueError(f"{FN}: beta must be in (0, 1), got {beta}")
    _check_int("seed", seed, 2**64)
    _check_int("step", step, 2**32)
    if not isinstance(add_noise, bool):
        raise TypeError(f"{FN}: add_noise must be a bool, got {type(add_noise).__name__}")


_unsupported = backends.unsupported  # every dtype on our extension, all but float64 on Triton


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
    _check_inputs(x, z_mu, z_sigma, beta, seed, step, add_noise)
    seed, step = int(seed), int(step)  # numpy ints too
    backend = backends.select(FN, x, _unsupported)
    if backend == "torch":
        return dpm2015_step_ref(x, z_mu, z_sigma, beta, seed=seed, step=step, add_noise=add_noise).contiguous()
    if isinstance(beta, Tensor):
        beta_t, beta_value = beta.to(torch.float64 if x.dtype == torch.float64 else torch.float32).reshape(1), 0.0
    else:
        beta_t, beta_value = None, float(beta)
    x = x.contiguous()
    z_mu = z_mu.to(x.dtype).contiguous()
    z_sigma = z_sigma.to(x.dtype).contiguous()
    signed_seed = seed - 2**64 if seed >= 2**63 else seed  # the schema's int is an int64
    op = getattr(torch.ops.diffusion_fast, OPS[backend])
    return op(x, z_mu, z_sigma, beta_t, beta_value, signed_seed, step, add_noise)


# The Triton twin runs kernels/dpm2015_step.py, imported on first use so that importing
# diffusion_fast never imports triton. CPU tensors reach it only under TRITON_INTERPRET=1.
def _triton_step(*args):
    from diffusion_fast.kernels import dpm2015_step as kernels

    return kernels.dpm2015_step(*args)


for _key in ("CPU", "CUDA"):
    backends.LIBRARY.impl(OPS["triton"], _triton_step, _key)
