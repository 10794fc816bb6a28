"""Fused sampler steps ``ddpm_step`` and ``ddim_step``: one pass over x_t and eps per step.

Both ops evaluate one row (a, b, c1, c2, c3, sigma) of a per-schedule coefficient table::

    x0  = a * x_t - b * eps;   x0 = clamp(x0, -clip_range, clip_range)   (if clip_x0)
    x_prev = c1 * x0 + c2 * x_t + c3 * eps + sigma * z

with z ~ N(0, I) generated inside the kernel from (seed, step, element index) by Philox4x32-10
(``diffusion_fast.ops.philox``), identical on every backend, or passed as ``noise``.

- DDPM (Ho et al. 2020, official ``p_sample``): a = sqrt(1/abar_t), b = sqrt(1/abar_t - 1),
  c1 = beta_t sqrt(abar_{t-1}) / (1 - abar_t), c2 = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t),
  c3 = 0, sigma = exp(log_var_t / 2) with log_var from ``fixedlarge`` (beta_t) or ``fixedsmall``
  (posterior variance, log clipped), and sigma = 0 at t = 0. Table: ``ddpm_coefficients``.
- DDIM (Song et al. 2021, eq. 12; diffusers ``DDIMScheduler.step``): a = 1/sqrt(abar_t),
  b = sqrt(1 - abar_t)/sqrt(abar_t), sigma = eta sqrt((1 - abar_prev)/(1 - abar_t))
  sqrt(1 - abar_t/abar_prev), c1 = sqrt(abar_prev), c3 = sqrt(1 - abar_prev - sigma^2), c2 = 0;
  with ``use_clipped_model_output`` the eps of the direction term is recomputed from the clipped
  x0, which folds into c1 and c2. Table: ``ddim_coefficients``.

A table lives on the sampling device; each step slices its row by a Python int (a view: no
``.item()``, no host sync) and the kernel reads it. x_t, eps, noise: any shape (B, ...),
float16/bfloat16/float32 (float64 on the CPU paths and the CUDA extension), math in float32
(float64 for float64). Outputs are in x_t's dtype, contiguous, or channels-last where x_t is (the
kernels run on contiguous copies, so the noise stays a function of the logical element index; a
model sampled in channels_last then gets channels_last input at every step). Sampling only: no autograd.

Backends: ``cuda`` (our extension: C++ on CPU tensors, CUDA on GPU tensors), ``triton``
and ``torch`` (``ddpm_step_ref``/``ddim_step_ref``), chosen per call by ``diffusion_fast.backends``.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from diffusion_fast import backends
from diffusion_fast.ops._noise_step import (backend_selector, check_bool, check_float_tensor, check_int, define,
                                            kernel_dtype, like_x, overloads, signed_seed)
from diffusion_fast.ops.group_norm_silu import _like_layout
from diffusion_fast.ops.philox import philox_normal_ref

__all__ = ["ddpm_step", "ddim_step", "ddpm_coefficients", "ddim_coefficients", "ddpm_step_ref", "ddim_step_ref"]

COEFFICIENTS = ("a", "b", "c1", "c2", "c3", "sigma")  # one row of a table
VARIANCES = ("fixedlarge", "fixedsmall")


# ---------------------------------------------------------------------------
# Coefficient tables, computed once per schedule in float64.
# ---------------------------------------------------------------------------
def _table(columns: Sequence[Tensor], like: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.stack([c.double() for c in columns], dim=1).to(device=like.device, dtype=dtype)


def _check_schedule(fn: str, name: str, t) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() != 1 or t.numel() == 0 or not t.is_floating_point():
        raise ValueError(f"{fn}: {name} must be a non-empty 1-D floating tensor")
    return t.detach().double().cpu()


def ddpm_coefficients(betas: Tensor, variance: str = "fixedlarge", *, dtype: torch.dtype = torch.float32) -> Tensor:
    """(T, 6) table for ``ddpm_step``: row t holds (a, b, c1, c2, c3, sigma) of timestep t.

    ``betas``: (T,) noise schedule; the table lands on its device. ``variance``: "fixedlarge"
    (sigma^2 = beta_t) or "fixedsmall" (posterior variance), as in the official DDPM code,
    whose log-variances start with the posterior variance at t = 1; sigma_0 = 0.
    """
    b = _check_schedule("ddpm_coefficients", "betas", betas)
    if variance not in VARIANCES:
        raise ValueError(f"ddpm_coefficients: variance must be one of {VARIANCES}, got {variance!r}")
    if not ((b > 0) & (b < 1)).all() or b.numel() < 2:
        raise ValueError("ddpm_coefficients: betas must hold at least 2 values, each in (0, 1)")
    alphas = 1.0 - b
    abar = torch.cumprod(alphas, 0)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    posterior_var = b * (1.0 - abar_prev) / (1.0 - abar)
    large = torch.cat([posterior_var[1:2], b[1:]])
    small = torch.cat([posterior_var[1:2], posterior_var[1:]])  # the official log clipping
    sigma = torch.exp(0.5 * torch.log(large if variance == "fixedlarge" else small))
    sigma[0] = 0.0  # no noise at t = 0
    columns = (torch.sqrt(1.0 / abar), torch.sqrt(1.0 / abar - 1.0),
               b * torch.sqrt(abar_prev) / (1.0 - abar), (1.0 - abar_prev) * torch.sqrt(alphas) / (1.0 - abar),
               torch.zeros_like(b), sigma)
    return _table(columns, betas, dtype)


def ddim_coefficients(alphas_cumprod: Tensor, timesteps: Union[Sequence[int], Tensor], eta: float = 0.0, *,
                      use_clipped_model_output: bool = False, final_alpha_cumprod: float = 1.0,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """(S, 6) table for ``ddim_step``: row i holds the step from ``timesteps[i]`` to ``timesteps[i + 1]``.

    ``timesteps``: the sampling subsequence, strictly decreasing in [0, T) (e.g. 980, 960, ..., 0);
    after the last one, abar_prev = ``final_alpha_cumprod`` (diffusers' ``set_alpha_to_one``
    gives 1.0). ``eta`` >= 0 (0: deterministic DDIM, 1: DDPM-like variance).
    ``use_clipped_model_output`` as in diffusers. The table lands on ``alphas_cumprod``'s device.
    """
    abar = _check_schedule("ddim_coefficients", "alphas_cumprod", alphas_cumprod)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"ddim_coefficients: eta must be a finite float >= 0, got {eta!r}")
    if not isinstance(use_clipped_model_output, bool):
        raise TypeError("ddim_coefficients: use_clipped_model_output must be a bool")
    final_alpha_cumprod = float(final_alpha_cumprod)
    if not 0.0 < final_alpha_cumprod <= 1.0:
        raise ValueError(f"ddim_coefficients: final_alpha_cumprod must be in (0, 1], got {final_alpha_cumprod!r}")
    ts = timesteps.tolist() if isinstance(timesteps, Tensor) else list(timesteps)
    n = abar.numel()
    if not ts or any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < n for t in ts):
        raise ValueError(f"ddim_coefficients: timesteps must be a non-empty sequence of ints in [0, {n})")
    ts = [int(t) for t in ts]
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError("ddim_coefficients: timesteps must be strictly decreasing (sampling order)")
    if not ((abar > 0) & (abar < 1)).all():
        raise ValueError("ddim_coefficients: alphas_cumprod must lie in (0, 1)")
    at = abar[ts]
    aprev = torch.cat([abar[ts[1:]], at.new_full((1,), final_alpha_cumprod)])
    sigma = eta * torch.sqrt((1.0 - aprev) / (1.0 - at)) * torch.sqrt(1.0 - at / aprev)
    direction = torch.sqrt((1.0 - aprev - sigma**2).clamp_min(0.0))
    if use_clipped_model_output:  # eps' = (x - sqrt(abar_t) x0) / sqrt(1 - abar_t)
        c1 = torch.sqrt(aprev) - direction * torch.sqrt(at / (1.0 - at))
        c2, c3 = direction / torch.sqrt(1.0 - at), torch.zeros_like(at)
    else:
        c1, c2, c3 = torch.sqrt(aprev), torch.zeros_like(at), direction
    columns = (1.0 / torch.sqrt(at), torch.sqrt((1.0 - at) / at), c1, c2, c3, sigma)
    return _table(columns, alphas_cumprod, dtype)


# ---------------------------------------------------------------------------
# Reference (plain PyTorch).
# ---------------------------------------------------------------------------
def _step_ref(x, eps, row, seed, step, clip, noise, upcast):
    compute = torch.promote_types(x.dtype, torch.float32) if upcast else x.dtype
    a, b, c1, c2, c3, sigma = row.to(device=x.device, dtype=compute).unbind()  # 0-d tensors: no sync
    xc, ec = x.to(compute), eps.to(compute)
    x0 = a * xc - b * ec
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    out = c1 * x0 + c2 * xc + c3 * ec
    if noise is not None:
        out = out + sigma * noise.to(compute)
    elif torch.compiler.is_compiling() or row.device.type != "cpu" or float(row[5]) != 0.0:  # CPU: sigma read freely
        out = out + sigma * philox_normal_ref(seed, step, x.numel(), compute, x.device).reshape(x.shape)
    return out.to(x.dtype), x0.to(x.dtype)


def ddpm_step_ref(x_t, eps, coefficients, t, *, seed=0, clip_x0=True, clip_range=1.0, noise=None,
                  return_x0=False, upcast=True):
    """Plain-PyTorch ``ddpm_step``; ``upcast`` computes in float32 (or x's dtype if wider)."""
    out, x0 = _step_ref(x_t, eps, coefficients[t], seed, t, clip_range if clip_x0 else None, noise, upcast)
    return (out, x0) if return_x0 else out


def ddim_step_ref(x_t, eps, coefficients, i, *, seed=0, clip_x0=True, clip_range=1.0, noise=None,
                  return_x0=False, upcast=True):
    """Plain-PyTorch ``ddim_step``; ``upcast`` computes in float32 (or x's dtype if wider)."""
    out, x0 = _step_ref(x_t, eps, coefficients[i], seed, i, clip_range if clip_x0 else None, noise, upcast)
    return (out, x0) if return_x0 else out


# ---------------------------------------------------------------------------
# Op schemas, defined once: ``ddpm_step``/``ddim_step`` are implemented in C++ (csrc/sampler_steps,
# CPU and CUDA dispatch keys), the ``_triton`` twins by kernels/sampler_steps.py. All four run
# one kernel; the names keep the two samplers apart in profiles. x0 is empty (0,) unless asked.
# ---------------------------------------------------------------------------
SCHEMA = ("(Tensor x, Tensor eps, Tensor coef, Tensor? noise, int seed, int step, float? clip, "
          "bool return_x0) -> (Tensor x_prev, Tensor x0)")


def _fake(x, eps, coef, noise, seed, step, clip, return_x0):
    return torch.empty_like(x), (torch.empty_like(x) if return_x0 else x.new_empty((0,)))


OPS = {op: define(op, SCHEMA, _fake, kernels="sampler_steps", launcher="sampler_step")
       for op in ("ddpm_step", "ddim_step")}
_OVERLOADS = {op: overloads(names) for op, names in OPS.items()}


# ---------------------------------------------------------------------------
# Argument checks: every bad input gets a ValueError/TypeError naming the argument.
# ---------------------------------------------------------------------------
def _check_inputs(fn, index_name, x, eps, coefficients, index, seed, clip_x0, clip_range, noise, return_x0):
    """Raise on bad input; else return (index, seed) as ints."""
    check_float_tensor(fn, "x_t", x, None)
    if x.dim() == 0:
        raise ValueError(f"{fn}: x_t must have shape (B, ...), got a 0-D tensor")
    check_float_tensor(fn, "eps", eps, x, "x_t")
    if eps.shape != x.shape:
        raise ValueError(f"{fn}: eps must have x_t's shape {tuple(x.shape)}, got {tuple(eps.shape)}")
    if noise is not None:
        check_float_tensor(fn, "noise", noise, x, "x_t")
        if noise.shape != x.shape:
            raise ValueError(f"{fn}: noise must have x_t's shape {tuple(x.shape)}, got {tuple(noise.shape)}")
    check_float_tensor(fn, "coefficients", coefficients, x, "x_t")
    if coefficients.dim() != 2 or coefficients.shape[1] != len(COEFFICIENTS):
        raise ValueError(f"{fn}: coefficients must be a (steps, {len(COEFFICIENTS)}) table from "
                         f"{fn.replace('step', 'coefficients')}, got shape {tuple(coefficients.shape)}")
    index, seed = check_int(fn, index_name, index, coefficients.shape[0]), check_int(fn, "seed", seed, 2**64)
    check_bool(fn, "clip_x0", clip_x0)
    check_bool(fn, "return_x0", return_x0)
    if isinstance(clip_range, bool) or not isinstance(clip_range, (int, float)):
        raise TypeError(f"{fn}: clip_range must be a float, got {type(clip_range).__name__}")
    if not (math.isfinite(clip_range) and clip_range > 0):
        raise ValueError(f"{fn}: clip_range must be finite and > 0, got {clip_range}")
    return index, seed


_unsupported = backends.unsupported  # every dtype on our extension, all but float64 on Triton
_BACKEND = {op: backend_selector(op, _unsupported) for op in OPS}


def _step(fn, x, eps, coefficients, index, seed, clip, noise, return_x0):
    backend = _BACKEND[fn](x)
    if backend == "torch":
        out, x0 = _step_ref(x, eps, coefficients[index], seed, index, clip, noise, True)
    else:
        row = coefficients[index].to(kernel_dtype(x)).contiguous()
        xc = x.contiguous()
        eps = like_x(eps, xc)
        noise = None if noise is None else like_x(noise, xc)
        out, x0 = _OVERLOADS[fn][backend](xc, eps, row, noise, signed_seed(seed), index, clip, return_x0)
    out = _like_layout(out, x)
    return (out, _like_layout(x0, x)) if return_x0 else out


def ddpm_step(x_t: Tensor, eps: Tensor, coefficients: Tensor, t: int, *, seed: int = 0, clip_x0: bool = True,
              clip_range: float = 1.0, noise: Optional[Tensor] = None, return_x0: bool = False):
    """One DDPM ancestral step x_t -> x_{t-1} (module doc), fused into one kernel.

    ``coefficients``: ``ddpm_coefficients(betas, variance)`` on x_t's device; ``t``: the
    timestep (row), also the noise stream's step. ``seed``: int in [0, 2**64). ``clip_x0``
    clips the predicted x0 to [-clip_range, clip_range] (the official sampler clips to [-1, 1]).
    ``noise`` replaces the generated z. Returns x_{t-1}, or (x_{t-1}, x0) with ``return_x0``.
    Not differentiable (sampling only).
    """
    t, seed = _check_inputs("ddpm_step", "t", x_t, eps, coefficients, t, seed, clip_x0, clip_range, noise, return_x0)
    return _step("ddpm_step", x_t, eps, coefficients, t, seed, float(clip_range) if clip_x0 else None, noise,
                 return_x0)


def ddim_step(x_t: Tensor, eps: Tensor, coefficients: Tensor, i: int, *, seed: int = 0, clip_x0: bool = True,
              clip_range: float = 1.0, noise: Optional[Tensor] = None, return_x0: bool = False):
    """One DDIM step from ``timesteps[i]`` to ``timesteps[i + 1]`` (module doc), fused into one kernel.

    ``coefficients``: ``ddim_coefficients(alphas_cumprod, timesteps, eta)`` on x_t's device;
    ``i``: the step's row, also the noise stream's step. ``clip_x0``/``clip_range`` as
    diffusers' ``clip_sample``/``clip_sample_range``; ``noise`` as its ``variance_noise``.
    Returns x_prev, or (x_prev, x0) with ``return_x0``. Not differentiable (sampling only).
    """
    i, seed = _check_inputs("ddim_step", "i", x_t, eps, coefficients, i, seed, clip_x0, clip_range, noise, return_x0)
    return _step("ddim_step", x_t, eps, coefficients, i, seed, float(clip_range) if clip_x0 else None, noise,
                 return_x0)
